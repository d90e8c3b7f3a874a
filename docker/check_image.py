"""Build the tptt-serve image on this host and check it for real, from outside the container.

    python docker/check_image.py              # or: make image-check
    python docker/check_image.py --build-only # or: make image

What it does, in order; every step has a time limit and a failure stops the run with the reason and the
container's log:
1. A Docker engine: the running one, or one it starts (dockerd with the vfs storage driver and no iptables, which
   runs inside containers and sandboxes; Debian's docker.io is installed first when root has apt and no dockerd).
   An engine it started is stopped at the end; nothing else is.
2. A base image: --base, or (default) a minimal Debian bookworm made with debootstrap and `docker import`ed as
   tptt-local/debian:bookworm, for hosts that cannot pull from a registry.
3. The server image from docker/Dockerfile for the CPU (no `cuda` extra, dtype auto), torch's CPU build from a local
   folder of wheels served over HTTP when pip's find-links has one, else from PyTorch's CPU index. Build time and
   image size are reported. A Prometheus image from Debian's package (docker/prometheus.Dockerfile).
4. The server container on its own network under the compose service name `server`, with a sessions volume,
   checked from the host with the official openai client: /health, /v1/models, a chat completion, a streamed
   one, /metrics; it runs as the non-root user; a named session survives `docker restart` through the volume.
5. Prometheus with the compose file's own command and docker/prometheus.yml scrapes it: `up` is 1 and a `tptt_`
   series exists.
6. The image serves a completion in a container started with `--network none` (nothing downloaded at run time).

Exit status: 0 every check passed; 1 a check failed; 77 no Docker engine can run here (tests skip on it).
Boundaries: this script drives the docker CLI and the server's public HTTP API only; it imports nothing from the
project, so it checks the image as a user gets it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCAL_BASE = "tptt-local/debian:bookworm"
SERVER_IMAGE = "tptt-serve:cpu"
CLUSTER_IMAGE = "tptt-serve:cluster"
PROMETHEUS_IMAGE = "tptt-prometheus:debian"
REDIS_IMAGE = "tptt-redis:debian"
DOCKERD_ARGS = ["--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none"]
NO_ENGINE = 77
SERVER_START_S = 300
WHEELS_PORT = 38401  # fixed: the build arguments are part of Docker's layer cache key


class CheckFailed(Exception):
    """A step that did not do what it must; the message says what was seen."""


def log(message: str) -> None:
    print(message, flush=True)


def run(*args: str, timeout: float = 120, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    """A command with a time limit; a non-zero exit (when `check`) or a timeout raises CheckFailed with its output."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise CheckFailed(f"`{' '.join(args)}` ran past {timeout:.0f} s") from error
    if check and result.returncode != 0:
        raise CheckFailed(f"`{' '.join(args)}` exited {result.returncode}:\n{tail(result.stdout + result.stderr)}")
    if not quiet and result.stdout.strip():
        log(result.stdout.rstrip())
    return result


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    return run("docker", *args, timeout=timeout, check=check, quiet=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, ready, limit_s: float, alive=lambda: None, every_s: float = 1.0):
    """Poll `ready()` until it returns a truthy value; `alive()` raises when waiting is pointless."""
    deadline = time.monotonic() + limit_s
    while True:
        alive()
        with contextlib.suppress(Exception):
            if value := ready():
                return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not ready after {limit_s:.0f} s")
        time.sleep(every_s)


# ----------------------------------------------------------------------------------------------- engine
@contextlib.contextmanager
def docker_engine():
    """The running engine, or one started here (and stopped on the way out)."""
    if not shutil.which("docker"):
        raise SystemExit(no_engine("no docker CLI on PATH"))
    if run("docker", "info", timeout=30, check=False, quiet=True).returncode == 0:
        yield
        return
    dockerd = shutil.which("dockerd") or install_docker_engine()
    log_file = tempfile.NamedTemporaryFile(prefix="dockerd-", suffix=".log", delete=False)
    process = subprocess.Popen([dockerd, *DOCKERD_ARGS], stdout=log_file, stderr=subprocess.STDOUT)
    log(f"started dockerd (pid {process.pid}, log {log_file.name})")
    try:
        try:
            wait_until("dockerd", lambda: run("docker", "info", timeout=10, check=False, quiet=True).returncode == 0,
                       60, alive=lambda: process.poll() is None or fail_dockerd(log_file.name))
        except CheckFailed as error:
            raise SystemExit(no_engine(f"{error}\n{tail(Path(log_file.name).read_text())}")) from error
        yield
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        if process.poll() is None:
            process.kill()
        log("stopped the dockerd started here")


def fail_dockerd(log_path: str):
    raise CheckFailed(f"dockerd exited:\n{tail(Path(log_path).read_text())}")


def install_docker_engine() -> str:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(no_engine("no Docker engine is running and dockerd is not installed"))
    log("installing Debian's docker.io")
    run("apt-get", "install", "-y", "--no-install-recommends", "docker.io", timeout=600, quiet=True)
    return shutil.which("dockerd") or "/usr/sbin/dockerd"


def no_engine(reason: str) -> int:
    log(f"image-check: no Docker engine can run here: {reason}")
    return NO_ENGINE


# ------------------------------------------------------------------------------------------------ build
def ensure_local_base(image: str) -> None:
    """A minimal Debian bookworm from debootstrap, imported as `image` (once; later runs reuse it)."""
    if docker("image", "inspect", image, check=False):
        return
    if os.geteuid() != 0:
        raise CheckFailed(f"{image} is missing and debootstrap needs root: run as root or pass --base IMAGE")
    if not shutil.which("debootstrap"):
        run("apt-get", "install", "-y", "--no-install-recommends", "debootstrap", timeout=600, quiet=True)
    with tempfile.TemporaryDirectory(prefix="tptt-rootfs-") as rootfs:
        log(f"debootstrap bookworm into {rootfs}")
        run("debootstrap", "--variant=minbase", "bookworm", rootfs, "http://deb.debian.org/debian",
            timeout=1200, quiet=True)
        for deb in Path(rootfs, "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", "-", image], stdin=tar.stdout, capture_output=True,
                                  text=True, timeout=600, check=False)
        tar.wait()
        if imported.returncode != 0:
            raise CheckFailed(f"docker import failed: {imported.stderr}")


def copy_host_ca_certificates() -> None:
    """The host's extra CA certificates into docker/ca-certificates/, so the build's pip trusts what the host's
    pip trusts (behind a TLS-inspecting proxy; nothing happens where the host has none)."""
    for certificate in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copyfile(certificate, ROOT / "docker/ca-certificates" / certificate.name)


def local_torch_wheels() -> Path | None:
    """A folder holding a CPU build of torch among pip's find-links (PIP_FIND_LINKS or pip's config), if any."""
    configured = os.environ.get("PIP_FIND_LINKS", "")
    if not configured:
        result = run(sys.executable, "-m", "pip", "config", "get", "global.find-links", check=False, quiet=True)
        configured = result.stdout.strip() if result.returncode == 0 else ""
    for folder in map(Path, configured.split()):
        if folder.is_dir() and any(folder.glob("torch-*+cpu-*.whl")):
            return folder
    return None


@contextlib.contextmanager
def served_folder(folder: Path):
    """`folder` over HTTP on a loopback port for the build's pip (the build runs on the host network): always the
    same port when it is free, so that a rebuild hits the layer cache."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def build(tag: str, dockerfile: Path, context: Path, build_args: dict[str, str], log_path: Path) -> float:
    """docker build on the host network (the build's apt and pip reach their registries); returns seconds."""
    args = [arg for key, value in build_args.items() for arg in ("--build-arg", f"{key}={value}")]
    started = time.monotonic()
    with open(log_path, "w") as out:
        try:
            result = subprocess.run(["docker", "build", "--network", "host", "-f", str(dockerfile), "-t", tag,
                                     *args, str(context)], stdout=out, stderr=subprocess.STDOUT, timeout=3600,
                                    check=False, env={**os.environ, "DOCKER_BUILDKIT": "0"})
        except subprocess.TimeoutExpired as error:
            raise CheckFailed(f"building {tag} ran past an hour (log: {log_path})") from error
    if result.returncode != 0:
        raise CheckFailed(f"building {tag} failed (log: {log_path}):\n{tail(log_path.read_text())}")
    return time.monotonic() - started


def build_images(args, report: dict) -> None:
    if args.base == LOCAL_BASE:
        ensure_local_base(LOCAL_BASE)
    copy_host_ca_certificates()
    server_args = {"BASE_IMAGE": args.base, "DEVICE": "cpu", "DTYPE": "auto"}
    images = [(SERVER_IMAGE, "", "build-server.log", "")]  # tag, extras, log file, report key prefix
    if args.cluster:
        images.append((CLUSTER_IMAGE, "cluster", "build-cluster.log", "cluster_"))
    wheels = local_torch_wheels()
    with contextlib.ExitStack() as stack:
        if wheels:
            url = stack.enter_context(served_folder(wheels))
            server_args |= {"PIP_FIND_LINKS": url, "PIP_TRUSTED_HOST": "127.0.0.1"}
            log(f"torch's CPU build from {wheels}, served at {url}")
        else:
            server_args["PIP_EXTRA_INDEX_URL"] = "https://download.pytorch.org/whl/cpu"
        for tag, extras, log_name, prefix in images:
            log(f"building {tag} (log: {args.log_dir / log_name})")
            seconds = build(tag, ROOT / "docker/Dockerfile", ROOT, server_args | {"EXTRAS": extras},
                            args.log_dir / log_name)
            size = int(docker("image", "inspect", "-f", "{{.Size}}", tag))
            report |= {f"{prefix}build_s": seconds, f"{prefix}image_bytes": size}
            log(f"[ok] built {tag} in {seconds:.0f} s, {size / 1e9:.2f} GB")
    if args.cluster:
        build(REDIS_IMAGE, ROOT / "docker/redis.Dockerfile", ROOT / "docker", {"BASE_IMAGE": args.base},
              args.log_dir / "build-redis.log")
    if not args.build_only:
        log(f"building {PROMETHEUS_IMAGE}")
        build(PROMETHEUS_IMAGE, ROOT / "docker/prometheus.Dockerfile", ROOT / "docker", {"BASE_IMAGE": args.base},
              args.log_dir / "build-prometheus.log")
        log(f"[ok] built {PROMETHEUS_IMAGE}")


# ------------------------------------------------------------------------------------------- containers
class Container:
    """A container started by this script, removed by `remove()`; its log goes into every failure message."""

    def __init__(self, name: str, *run_args: str):
        self.name = name
        docker("rm", "-f", "-v", name, check=False)
        docker("run", "-d", "--name", name, *run_args, timeout=120)

    def alive(self) -> None:
        if docker("inspect", "-f", "{{.State.Running}}", self.name, check=False) != "true":
            raise CheckFailed(f"container {self.name} stopped:\n{self.logs()}")

    def logs(self) -> str:
        result = run("docker", "logs", "--tail", "40", self.name, check=False, quiet=True)
        return tail(result.stdout + result.stderr)

    def exec(self, *command: str, timeout: float = 60) -> str:
        return docker("exec", self.name, *command, timeout=timeout)

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.name, check=False)  # with its anonymous volumes


def http_get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def wait_healthy(container: Container, base_url: str) -> float:
    started = time.monotonic()
    wait_until(f"{container.name} /health", lambda: json.loads(http_get(f"{base_url}/health")), SERVER_START_S,
               alive=container.alive)
    return time.monotonic() - started


def check_api(base_url: str, report: dict) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="image-check", timeout=120, max_retries=0)
    (model,) = [m.id for m in client.models.list().data]
    question = [{"role": "user", "content": "Name three colours of the rainbow."}]
    reply = client.chat.completions.create(model=model, messages=question, max_tokens=16, temperature=0)
    text = reply.choices[0].message.content
    if not text or reply.usage.completion_tokens < 1:
        raise CheckFailed(f"chat completion came back empty: {reply}")
    log(f"[ok] chat completion ({model}): {text!r}")
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=model, messages=question, max_tokens=16, temperature=0, stream=True) if chunk.choices]
    if sum(1 for piece in pieces if piece) < 2 or "".join(pieces) != text:
        raise CheckFailed(f"streamed completion {pieces!r} is not the same text as {text!r} in several chunks")
    log(f"[ok] streamed chat completion: {len(pieces)} chunks, the same text")
    metrics = http_get(f"{base_url}/metrics").decode()
    served = [line for line in metrics.splitlines() if line.startswith("tptt_request_success_total{")]
    if not served:
        raise CheckFailed("/metrics has no tptt_request_success_total series after two requests")
    log(f"[ok] /metrics: {sum(line.startswith('tptt_') for line in metrics.splitlines())} tptt_ samples")
    report["model"] = model


def session_turn(base_url: str, model: str, session_id: str, content: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="image-check", timeout=120, max_retries=0)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                           max_tokens=8, temperature=0, extra_body={"session_id": session_id})
    return reply.model_dump()


def check_session_survives_restart(server: Container, base_url: str, model: str) -> None:
    session = "image-check-restart"
    session_turn(base_url, model, session, "My name is Ada and I keep bees.")
    before = json.loads(http_get(f"{base_url}/v1/sessions/{session}"))
    docker("restart", server.name, timeout=120)
    wait_healthy(server, base_url)
    after = json.loads(http_get(f"{base_url}/v1/sessions/{session}"))
    if after["num_tokens"] != before["num_tokens"]:
        raise CheckFailed(f"session after restart {after} differs from before {before}")
    usage = session_turn(base_url, model, session, "What do I keep?")["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    if cached < before["num_tokens"] - 1:  # all but the last sampled token, which the state never consumed
        raise CheckFailed(f"the turn after restart reused {cached} of the session's {before['num_tokens']} tokens")
    log(f"[ok] named session survived docker restart: {before['num_tokens']} tokens, {cached} reused after it")


def check_non_root(server: Container) -> None:
    uid = server.exec("id", "-u")
    user = docker("inspect", "-f", "{{.Config.User}}", server.name)
    if uid == "0" or user in ("", "root", "0"):
        raise CheckFailed(f"the server runs as uid {uid} (image user {user!r})")
    log(f"[ok] runs as user {user} (uid {uid})")


def prometheus_query(api: str, expr: str) -> list:
    answer = json.loads(http_get(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    return answer["data"]["result"]


def check_prometheus(network: str, port: int, containers: list) -> None:
    """Prometheus with the compose file's command and config file, on the server's network (added to
    `containers`, so that it is removed with them)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["prometheus"]
    config = next(v.split(":")[1] for v in compose["volumes"] if v.startswith("./docker/prometheus.yml:"))
    prometheus = Container("tptt-check-prometheus", "--network", network, "-p", f"127.0.0.1:{port}:9090",
                           "-v", f"{ROOT / 'docker/prometheus.yml'}:{config}:ro", PROMETHEUS_IMAGE,
                           *compose["command"])
    containers.append(prometheus)
    api = f"http://127.0.0.1:{port}"
    up = wait_until("prometheus: up{job='tptt-serve'} == 1",
                    lambda: [r for r in prometheus_query(api, 'up{job="tptt-serve"}') if r["value"][1] == "1"],
                    90, alive=prometheus.alive)
    series = wait_until("prometheus: a tptt_ series",
                        lambda: prometheus_query(api, 'count({__name__=~"tptt_.+"})'), 60, alive=prometheus.alive)
    log(f"[ok] Prometheus scrapes {up[0]['metric']['instance']}: up = 1, {series[0]['value'][1]} tptt_ series")


def check_offline(image: str, model: str) -> None:
    """The image serves a completion with no network at all (the model was baked at build time)."""
    offline = Container("tptt-check-offline", "--network", "none", image)
    body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 4})
    request = ("import json, urllib.request as u; r = u.Request('http://127.0.0.1:8000/v1/completions', "
               f"{body!r}.encode(), {{'Content-Type': 'application/json'}}); "
               "print(json.load(u.urlopen(r, timeout=120))['choices'][0]['text'])")
    try:
        wait_until("--network none container /health",
                   lambda: offline.exec("python", "-c", "import urllib.request as u; "
                                        "u.urlopen('http://127.0.0.1:8000/health', timeout=4)", timeout=30) == "",
                   SERVER_START_S, alive=offline.alive, every_s=2)
        text = offline.exec("python", "-c", request, timeout=180)
        log(f"[ok] --network none: serves a completion ({text!r})")
    finally:
        offline.remove()


@contextlib.contextmanager
def scratch_network(name: str, keep: bool, volumes: tuple[str, ...] = ()):
    """A network for one group of checks; yields the list those checks add their containers to. Any failure inside
    becomes a CheckFailed with those containers' logs; the containers, the network and `volumes` are removed after
    (unless `keep`)."""
    docker("network", "create", name)
    containers: list[Container] = []
    try:
        yield containers
    except Exception as error:  # noqa: BLE001 - an HTTP or client error is a failed check, with the logs
        logs = "".join(f"\n--- {c.name} log ---\n{c.logs()}" for c in containers)
        raise CheckFailed(f"{type(error).__name__}: {error}{logs}") from error
    finally:
        if not keep:
            for container in reversed(containers):
                container.remove()
            docker("network", "rm", name, check=False)
            for volume in volumes:
                docker("volume", "rm", volume, check=False)


def check_containers(args, report: dict) -> None:
    suffix = str(os.getpid())
    network, volume = f"tptt-check-{suffix}", f"tptt-check-sessions-{suffix}"
    port, prometheus_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{port}"
    with scratch_network(network, args.keep, (volume,)) as containers:
        server = Container("tptt-check-server", "--network", network, "--network-alias", "server",
                           "-p", f"127.0.0.1:{port}:8000", "-v", f"{volume}:/data/sessions", SERVER_IMAGE)
        containers.append(server)
        report["start_s"] = wait_healthy(server, base_url)
        log(f"[ok] /health answered {report['start_s']:.0f} s after the container started")
        check_api(base_url, report)
        check_non_root(server)
        check_prometheus(network, prometheus_port, containers)
        check_session_survives_restart(server, base_url, report["model"])
    check_offline(SERVER_IMAGE, report["model"])


def replicas_in_metrics(base_url: str) -> set[str]:
    lines = http_get(f"{base_url}/metrics").decode().splitlines()
    return {line.split('replica="')[1].split('"')[0] for line in lines if line.startswith("tptt_num_requests_running{")}


def check_cluster(args, report: dict) -> None:
    """The compose file's server-cluster service (its environment and shm size) on the cluster image, beside its
    redis service: replicas come up, a named session's turns land on one replica, /metrics carries both."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    service = services["server-cluster"]
    defaults = {key: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)) for key, value in service["environment"].items()}
    environment = {key: value for key, value in defaults.items() if value}  # compose's `${VAR:-default}` defaults
    network, port = f"tptt-cluster-{os.getpid()}", free_port()
    base_url = f"http://127.0.0.1:{port}"
    with scratch_network(network, args.keep) as containers:
        containers.append(Container("tptt-check-redis", "--network", network, "--network-alias", "redis",
                                    REDIS_IMAGE, *services["redis"]["command"]))
        env_args = [arg for key, value in environment.items() for arg in ("-e", f"{key}={value}")]
        server = Container("tptt-check-cluster", "--network", network, "-p", f"127.0.0.1:{port}:8000",
                           "--shm-size", service["shm_size"], *env_args, CLUSTER_IMAGE)
        containers.append(server)
        report["cluster_start_s"] = wait_healthy(server, base_url)
        log(f"[ok] cluster mode (2 replicas): /health after {report['cluster_start_s']:.0f} s")
        replicas = set()
        for content in ("My name is Ada.", "What is my name?"):
            request = urllib.request.Request(f"{base_url}/v1/chat/completions", json.dumps(
                {"model": report["model"], "max_tokens": 6, "session_id": "cluster-check",
                 "messages": [{"role": "user", "content": content}]}).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                replicas.add(response.headers["x-tptt-replica"].split()[0])
        if len(replicas) != 1:
            raise CheckFailed(f"a named session's turns went to several replicas: {replicas}")
        labels = wait_until("both replicas in /metrics",
                            lambda: found if len(found := replicas_in_metrics(base_url)) == 2 else None, 60)
        log(f"[ok] cluster mode: a named session stays on one replica, /metrics labels both replicas "
            f"({', '.join(sorted(labels))})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=LOCAL_BASE,
                        help=f"base image (default: {LOCAL_BASE}, made here with debootstrap when missing)")
    parser.add_argument("--build-only", action="store_true", help=f"build {SERVER_IMAGE} and stop")
    parser.add_argument("--cluster", action="store_true",
                        help=f"also build {CLUSTER_IMAGE} (the `cluster` extra) and run the compose file's "
                             "server-cluster service with 2 replicas beside a Redis container")
    parser.add_argument("--keep", action="store_true", help="leave the check's server and Prometheus running")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "tptt-image-check")
    parser.add_argument("--report", type=Path, help="write the figures (build time, size, start time) as JSON")
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"base": args.base}
    try:
        with docker_engine():
            build_images(args, report)
            if not args.build_only:
                check_containers(args, report)
                if args.cluster:
                    check_cluster(args, report)
    except CheckFailed as error:
        log(f"image-check FAILED: {error}")
        return 1
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    log("image-check: every check passed" if not args.build_only else f"image {SERVER_IMAGE} built")
    log(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
