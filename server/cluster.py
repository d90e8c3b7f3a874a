"""Cluster mode: `tptt-serve --replicas N` (or --min-replicas / --max-replicas) on Ray Serve, sessions in Redis.

One Ray Serve application of two deployments:

    Front   the HTTP ingress (no model, no CPU reserved). It reads each request, derives its routing key and
            forwards the whole request (method, path, headers, body) to an engine replica through a deployment
            handle with `session_id=<key>`; the answer streams back unchanged (SSE included).
    Engine  N replicas (or autoscaled), each the single-process server: a model, an engine and the same FastAPI
            app, called in-process over ASGI. All of them share the session store through Redis (--redis-url is
            required), so any replica resumes any conversation.

Routing: Ray Serve's ConsistentHashRouter maps the key to a replica on a hash ring; a full or dead replica's
requests go to the next ones on the ring, which resume from Redis. The key is the API key plus the named session
(`session_id` in the body or `X-Session-ID`); for an unnamed chat the API key plus its first message (the
conversation's start, which every later turn resends); for a completion the start of its prompt.

Every response carries `X-TPTT-Replica` (replica id and pid). Metrics: each engine replica serves its own registry
on an ephemeral loopback port and registers it in Redis; the Front's /metrics gathers every live replica's samples
and adds a `replica` label, so one Prometheus target sees the whole cluster.
"""

import asyncio
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from dataclasses import asdict, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import APIError
from .settings import Settings

log = logging.getLogger("tptt-serve.cluster")

APP_NAME = "tptt"
HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}
REPLICA_TTL_S = 30  # a replica's metrics address expires from Redis unless refreshed
SHUTDOWN_S = 10     # requests in flight get this long to finish when the cluster stops
QUIET = {"enable_access_log": False, "log_level": "WARNING"}  # Ray Serve's per-request lines; ours stay


# ------------------------------------------------------------------------------------------- routing
def routing_key(path: str, headers, body: bytes) -> str:
    """API key + the conversation: the named session, else the first message (chat) or prompt start."""
    api_key = headers.get("authorization", "")
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        payload = {}
    payload = payload if isinstance(payload, dict) else {}
    session = payload.get("session_id") or headers.get("x-session-id")
    if session:
        conversation = f"session:{session}"
    elif isinstance(payload.get("messages"), list) and payload["messages"]:
        conversation = "chat:" + json.dumps(payload["messages"][0], sort_keys=True)
    elif "prompt" in payload:
        conversation = "prompt:" + json.dumps(payload["prompt"])[:256]
    else:
        conversation = f"path:{path}"
    return hashlib.sha256(f"{api_key}\0{conversation}".encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------- ASGI
async def call_asgi(app, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes):
    """Call an ASGI app in-process; yields {"status", "headers"} first, then the body's chunks. Closing the
    generator early (the client went away) tells the app the client disconnected."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(app(scope, receive, messages.put))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": message.get("headers", [])}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    break
        await task
    finally:
        disconnected.set()
        if not task.done():
            await asyncio.wait_for(asyncio.shield(task), timeout=30)


# ------------------------------------------------------------------------------------------- health
def cluster_health(replica: dict, live: int | None, expected: int, was_ready: bool) -> tuple[int, dict]:
    """The Front's /health from one replica's own /health and the count of live replicas (None: Redis, which
    counts them, is unreachable). 503 "starting" until `expected` replicas have been up at once (so that a
    load balancer or `docker compose` sends traffic only to a full hash ring); later, fewer is "degraded"
    (a replica died and Ray restarts it; the others serve its conversations from Redis)."""
    if live is None:
        return 200, {**replica, "replicas": None, "expected_replicas": expected}
    status = "ok" if live >= expected else "degraded" if was_ready else "starting"
    body = {**replica, "status": status, "replicas": live, "expected_replicas": expected}
    return (503 if status == "starting" else 200), body


# ------------------------------------------------------------------------------------------ metrics
def replicas_key(settings: Settings) -> str:
    return f"tptt:cluster:{settings.port}:replicas"


def labelled(text: str, replica: str) -> str:
    """Prometheus text with `replica="<id>"` added to every sample (HELP/TYPE lines kept once by the caller)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=len(line))
        if line[name_end:name_end + 1] == "{":
            out.append(f'{line[:name_end]}{{replica="{replica}",{line[name_end + 1:]}')
        else:
            out.append(f'{line[:name_end]}{{replica="{replica}"}}{line[name_end:]}')
    return "\n".join(out)


def merged_metrics(pages: dict[str, str]) -> str:
    """One exposition of several replicas' pages: each family's HELP / TYPE once, every sample labelled."""
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for replica, text in sorted(pages.items()):
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                headers.setdefault(family, [])
                if line not in headers[family]:
                    headers[family].append(line)
            elif line and family is not None:
                families.setdefault(family, []).append(labelled(line, replica))
    return "\n".join(line for family in headers for line in (*headers[family], *families.get(family, []))) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- deployments
def build_application(settings: Settings):
    """The Ray Serve application (Front + Engine) for `settings`."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    front_app = FastAPI(title="tptt-serve (cluster)", openapi_url=None, docs_url=None, redoc_url=None)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
                      graceful_shutdown_timeout_s=SHUTDOWN_S, logging_config=QUIET)
    @serve.ingress(front_app)
    class Front:
        def __init__(self, engine, settings_dict: dict):
            import redis

            self.engine = engine.options(stream=True)
            self.settings = Settings(**settings_dict)
            self.redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=2)  # replicas' metrics addresses
            self.expected_replicas = self.settings.replicas or max(self.settings.min_replicas, 1)
            self.was_ready = False  # `expected_replicas` have been up at once

        @front_app.get("/health")
        async def health(self) -> Response:
            import redis

            stream = self.engine.options(session_id="health").handle.remote("GET", "/health", b"", [], b"")
            try:
                start = await stream.__anext__()
                replica = json.loads(b"".join([chunk async for chunk in stream]))
            except Exception as error:  # noqa: BLE001 - no replica answered: not healthy
                log.warning("cluster mode: no replica answered /health: %s", error)
                return APIError(503, "no replica answers", kind="service_unavailable_error").response()
            if start["status"] != 200:
                return JSONResponse(replica, status_code=start["status"])
            try:
                live = len(await asyncio.to_thread(self._live_replicas))
            except redis.RedisError:  # Redis counts the replicas: unknown now, the replica's own word stands
                live = None
            self.was_ready = self.was_ready or (live or 0) >= self.expected_replicas
            status, body = cluster_health(replica, live, self.expected_replicas, self.was_ready)
            return JSONResponse(body, status_code=status)

        @front_app.get("/metrics")
        async def metrics(self) -> Response:
            return Response(await asyncio.to_thread(self._gather_metrics), media_type="text/plain; version=0.0.4")

        @front_app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"])
        async def forward(self, path: str, request: Request):
            body = await request.body()
            key = routing_key(request.url.path, request.headers, body)
            stream = self.engine.options(session_id=key).handle.remote(
                request.method, request.url.path, request.url.query.encode(), list(request.headers.raw), body)
            try:
                start = await stream.__anext__()
            except Exception as error:  # noqa: BLE001 - the replica died before answering: retryable, say so
                log.warning("cluster mode: no replica answered %s %s: %s", request.method, request.url.path, error)
                return APIError(503, "no replica could take the request; retry it (a conversation resumes on any "
                                "replica)", kind="service_unavailable_error", headers={"Retry-After": "1"}).response()
            headers = {k.decode(): v.decode() for k, v in start["headers"] if k.decode().lower() not in HOP_BY_HOP}
            return StreamingResponse(stream, status_code=start["status"], headers=headers)

        def _live_replicas(self) -> dict[str, str]:
            """Replica id -> its metrics URL, for replicas whose heartbeat in Redis is fresh."""
            live = {}
            for replica, address in self.redis.hgetall(replicas_key(self.settings)).items():
                url, seen = json.loads(address)
                if time.time() - seen <= REPLICA_TTL_S:
                    live[replica.decode()] = url
            return live

        def _gather_metrics(self) -> str:
            pages = {}
            for replica, url in self._live_replicas().items():
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        pages[replica] = response.read().decode()
                except OSError:
                    continue
            return merged_metrics(pages)

    replicas = max(settings.replicas, settings.max_replicas)
    resources = {"num_cpus": settings.threads or 1}
    if settings.device.startswith("cuda"):  # Ray hides the GPUs from an actor that asks for none
        resources["num_gpus"] = 1 / replicas  # every replica fits on one GPU (not checked on a GPU host yet)
    engine_options = {"ray_actor_options": resources, "max_ongoing_requests": 1024,
                      "graceful_shutdown_timeout_s": SHUTDOWN_S, "logging_config": QUIET,
                      "request_router_config": RequestRouterConfig(
                          request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
                          request_router_kwargs={"num_fallback_replicas": 2})}
    if settings.max_replicas:
        engine_options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=settings.min_replicas or 1, max_replicas=settings.max_replicas,
            target_ongoing_requests=settings.max_num_seqs // 2 or 1)
    else:
        engine_options["num_replicas"] = settings.replicas

    @serve.deployment(**engine_options)
    class Engine:
        async def __init__(self, settings_dict: dict):
            import torch

            from .app import create_app
            from .cli import load_model

            self.settings = Settings(**settings_dict)
            self.replica_id = serve.get_replica_context().replica_id.unique_id
            self.replica = f"{self.replica_id} pid={os.getpid()}"
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            self.app = create_app(self.settings, await asyncio.to_thread(load_model, self.settings))
            self.lifespan = self.app.router.lifespan_context(self.app)
            await self.lifespan.__aenter__()  # starts the engine thread
            self._publish_metrics()

        async def __del__(self):
            await self.lifespan.__aexit__(None, None, None)  # stops the engine, flushes the store

        async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes):
            async for item in call_asgi(self.app, method, path, query, headers, body):
                if isinstance(item, dict):
                    item["headers"] = [*item["headers"], (b"x-tptt-replica", self.replica.encode())]
                yield item

        def _publish_metrics(self) -> None:
            """Serve this replica's registry on a loopback port and keep its address fresh in Redis."""
            from prometheus_client import start_http_server

            port = free_port()
            start_http_server(port, addr="127.0.0.1", registry=self.app.state.ctx.metrics.registry)
            url = f"http://127.0.0.1:{port}/metrics"
            threading.Thread(target=self._heartbeat, args=(url,), daemon=True, name="metrics-heartbeat").start()

        def _heartbeat(self, url: str) -> None:
            import redis

            client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=2)
            while True:
                try:
                    client.hset(replicas_key(self.settings), self.replica_id, json.dumps([url, time.time()]))
                except redis.RedisError:
                    pass
                time.sleep(REPLICA_TTL_S / 3)

    engine_settings = asdict(replace(settings, replicas=0, min_replicas=0, max_replicas=0))
    return Front.bind(Engine.bind(engine_settings), asdict(settings))


def app_builder(args: dict):
    """Application builder for `serve run` and KubeRay's RayService (`import_path: server.cluster:app_builder`):
    `args` are Settings fields (e.g. {"redis_url": ..., "replicas": 2}); TPTT_* environment variables fill the rest."""
    argv = []
    for key, value in args.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        else:
            argv += [f"--{name}={item}" for item in (value if isinstance(value, list) else [value])]
    settings = Settings.from_args(argv)
    if not settings.cluster:
        raise ValueError("the application builder serves cluster mode: give replicas or max_replicas")
    return build_application(settings)


def serve_cluster(settings: Settings) -> None:
    """Start (or join, with --ray-address) Ray, run the application on settings.host:port, block until stopped."""
    import ray
    from ray import serve

    ray.init(address=settings.ray_address or None, include_dashboard=False, logging_level="warning")
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
    log.info("cluster mode: serving on http://%s:%d", settings.host, settings.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    log.info("cluster mode: stopping")
    polite = threading.Thread(target=serve.shutdown, daemon=True)
    polite.start()
    polite.join(timeout=SHUTDOWN_S + 20)
    ray.shutdown()
