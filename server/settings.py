"""Server settings: one dataclass, read from CLI flags and TPTT_* environment variables (flags win).

Every field is a flag `--field-name` and an environment variable `TPTT_FIELD_NAME`; the README's settings table is
this file. List fields (api_key) take a comma-separated environment value and repeatable flags.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from tptt_runtime.engine import EngineConfig
from tptt_runtime.loading import DTYPE_NAMES

HELP = {
    "model": "'default' (SmolLM2-135M-Instruct + TPTT adapter), a .gguf file, a Hugging Face dir or an adapter dir",
    "served_model_name": "name clients put in `model` (default: derived from --model)",
    "host": "address to bind (0.0.0.0 in containers)",
    "port": "port to bind",
    "api_key": "accepted API key(s); none = no authentication. Sessions belong to the key that made them",
    "device": "torch device (cpu, cuda)",
    "dtype": "weights dtype (auto, float32, bfloat16, float16); auto = bfloat16 on GPUs and on CPUs with native "
             "bfloat16 dot products (AVX512-BF16, AMX), float32 elsewhere; memory states are always float32",
    "threads": "torch CPU threads of the engine thread (0 = torch's default; 1 helps on hosts shared with other busy "
               "processes); the server's other threads run torch single-threaded",
    "max_num_seqs": "requests decoded together at most",
    "max_num_batched_tokens": "tokens per engine step (decode rows + prefill chunks)",
    "max_waiting": "queued requests beyond which new ones get 429",
    "max_prompt_tokens": "longest accepted prompt in tokens",
    "max_tokens_limit": "largest max_tokens a request may ask for (also the chat default)",
    "prefix_reuse": "resume prompts from stored state snapshots (multi-turn reuse)",
    "store_bytes": "bytes of resident state snapshots (LRU beyond, spilled to --store-dir)",
    "store_dir": "directory where snapshots and named sessions spill and persist across restarts",
    "store_disk_bytes": "cap on unpinned snapshot files in --store-dir (0 = no cap)",
    "redis_url": "Redis shared by several servers (redis://host:6379/0): every snapshot and named session is also "
                 "written there, so any of them resumes any conversation; serving goes on without it when it is down",
    "replicas": "cluster mode: serve from this many Ray Serve replicas (one engine each; needs --redis-url); "
                "0 = one process, no Ray",
    "min_replicas": "cluster mode with autoscaling: fewest replicas (with --max-replicas)",
    "max_replicas": "cluster mode with autoscaling: most replicas (Ray Serve adds replicas as requests queue)",
    "ray_address": "cluster mode: the Ray cluster to join (e.g. ray://head:10001 or auto); empty = start a local one",
    "max_body_bytes": "largest accepted request body (413 beyond)",
    "compile": "decode steps through one compiled graph: serves eagerly at once, loads the graph from "
               "--compile-cache (seconds) or builds it there (minutes on a small CPU, once per model and torch "
               "version) on a copy of the model in the background, and switches to it when it is ready",
    "compile_cache": "directory of compiled decode graphs and Inductor's kernels, kept across restarts "
                     "(default ~/.cache/tptt/compiled)",
    "cuda_graphs": "on a CUDA device, replay decode steps as CUDA graphs (one per batch-size bucket, recorded on "
                   "first use); --no-cuda-graphs runs them op by op",
    "mixed_steps": "a step that prefills carries the decoding requests' rows in the same forward (one pass over "
                   "the weights); --no-mixed-steps decodes them in a forward of their own",
    "log_level": "debug, info, warning, error",
    "log_prompts": "log prompt text (off by default: prompts never reach the logs)",
}


@dataclass
class Settings:
    model: str = "default"
    served_model_name: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "auto"
    threads: int = 0
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    max_waiting: int = 256
    max_prompt_tokens: int = 65536
    max_tokens_limit: int = 4096
    prefix_reuse: bool = True
    store_bytes: int = 1 << 30
    store_dir: str = ""
    store_disk_bytes: int = 0
    redis_url: str = ""
    replicas: int = 0
    min_replicas: int = 0
    max_replicas: int = 0
    ray_address: str = ""
    max_body_bytes: int = 8 << 20
    compile: bool = False
    compile_cache: str = ""
    cuda_graphs: bool = True
    mixed_steps: bool = True
    log_level: str = "info"
    log_prompts: bool = False

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError("dtype must be auto, float32, bfloat16 or float16")
        if self.threads < 0:
            raise ValueError("threads must be >= 0")
        if self.max_tokens_limit < 1:
            raise ValueError("max_tokens_limit must be >= 1")
        if min(self.replicas, self.min_replicas, self.max_replicas) < 0:
            raise ValueError("replicas, min_replicas and max_replicas must be >= 0")
        if self.min_replicas > self.max_replicas:
            raise ValueError("--min-replicas needs a --max-replicas at least as large")
        if self.replicas and self.max_replicas:
            raise ValueError("give either --replicas (fixed) or --min-replicas / --max-replicas (autoscaling)")
        if self.cluster and not self.redis_url:
            raise ValueError("cluster mode (--replicas / --max-replicas) needs --redis-url: the replicas share "
                             "sessions through it")
        self.engine_config()  # validates the engine's share

    @property
    def cluster(self) -> bool:
        """Serve on Ray Serve replicas rather than in this process."""
        return bool(self.replicas or self.max_replicas)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_waiting=self.max_waiting, max_prompt_tokens=self.max_prompt_tokens, prefix_reuse=self.prefix_reuse,
            store_bytes=self.store_bytes, store_dir=self.store_dir or None,
            store_disk_bytes=self.store_disk_bytes or None, redis_url=self.redis_url or None,
            cuda_graphs=self.cuda_graphs, mixed_steps=self.mixed_steps)

    @classmethod
    def from_args(cls, argv: list[str] | None = None, environ=os.environ) -> "Settings":
        parser = argparse.ArgumentParser(prog="tptt-serve", description="OpenAI-compatible TPTT server")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.type == "bool":
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name])
            elif f.type == "list[str]":
                parser.add_argument(flag, action="append", default=None, help=HELP[f.name])
            else:
                parser.add_argument(flag, type=int if f.type == "int" else str, default=None, help=HELP[f.name])
        args = vars(parser.parse_args(argv))
        values = {}
        for f in fields(cls):
            value = args[f.name]
            if value is None:
                value = from_env(f.name, f.type, environ)
            if value is not None:
                values[f.name] = value
        return cls(**values)


def from_env(name: str, kind: str, environ) -> object:
    raw = environ.get("TPTT_" + name.upper())
    if raw is None or raw == "":
        return None
    if kind == "bool":
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"TPTT_{name.upper()}={raw!r} is not a boolean")
        return raw.lower() in ("1", "true", "yes", "on")
    if kind == "int":
        return int(raw)
    if kind == "list[str]":
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw
