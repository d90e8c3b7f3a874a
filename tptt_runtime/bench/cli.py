"""`tptt-bench`: benchmarks that always run our runtime and the baseline side by side and report ratios."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..loading import DTYPE_NAMES, resolve_dtype
from .shapes import SHAPES

DTYPE_HELP = "weights dtype of ours and the baseline alike; auto: what the server picks on this device"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tptt-bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    runtime = sub.add_parser("runtime", help="prefill / decode / memory vs Hugging Face with a full KV cache")
    runtime.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 16384, 32768])
    runtime.add_argument("--baseline-max", type=int, default=16384,
                         help="run the baseline only up to this context (it is quadratic)")
    runtime.add_argument("--decode-tokens", type=int, default=16)
    runtime.add_argument("--mag-weight", type=float, default=None,
                         help="a constant memory weight instead of the default adapter's (which is used as is, "
                              "unless it has no memory: then 0.5, so the DeltaProduct branch is always measured)")
    runtime.add_argument("--cache-tokens", type=int, default=None,
                         help="exact-token cache size instead of the default adapter's (0: none)")
    runtime.add_argument("--compile", action="store_true",
                         help="our decode step through torch.compile (TitansModel.compile); the baseline stays "
                              "as Hugging Face generate runs it")
    runtime.add_argument("--batch", type=int, nargs="+", default=[1],
                         help="decode batch sizes (rows decode from copies of the prefilled sequence)")
    runtime.add_argument("--shape", choices=["default", *SHAPES], default="default",
                         help="default: the shipped model; else a transformers Llama config shape, random weights")
    runtime.add_argument("--device", default="cpu", help="cpu or cuda")
    runtime.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                         help="on CUDA, our decode steps replayed as CUDA graphs, as the server runs them")
    runtime.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help=DTYPE_HELP)
    runtime.add_argument("--out", type=Path, default=Path("bench-results"))
    server = sub.add_parser("server", help="served throughput (1 vs N streams) and multi-turn time to first token")
    server.add_argument("--turn-tokens", type=int, default=2048, help="tokens of each long user turn")
    server.add_argument("--reply-tokens", type=int, default=32,
                        help="cap on the assistant's replies to turns 1 and 2 (part of turn 3's cached prefix)")
    server.add_argument("--clients", type=int, default=16)
    server.add_argument("--decode-tokens", type=int, default=64)
    server.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help=DTYPE_HELP)
    server.add_argument("--compile", action="store_true",
                        help="as `make serve`: measure once the server's background compile has swapped in")
    server.add_argument("--out", type=Path, default=Path("bench-results"))
    cluster = sub.add_parser("cluster", help="moving a conversation between servers through Redis vs staying, "
                                             "vs a cold prefill; the session move itself")
    cluster.add_argument("--turn-tokens", type=int, default=1024, help="tokens of each user turn")
    cluster.add_argument("--reply-tokens", type=int, default=16, help="cap on the replies to turns 1 and 2")
    cluster.add_argument("--trials", type=int, default=3, help="chat pairs (one stays, one moves)")
    cluster.add_argument("--moves", type=int, default=50, help="timed Redis reads + restores of one state")
    cluster.add_argument("--clients", type=int, default=8, help="concurrent streams for the replica scaling")
    cluster.add_argument("--decode-tokens", type=int, default=32)
    cluster.add_argument("--no-ray", action="store_true", help="skip the Ray Serve replicas (no `cluster` extra)")
    cluster.add_argument("--out", type=Path, default=Path("bench-results"))
    load = sub.add_parser("load", help="bounded load test (loopback): N clients for a while, errors, p50/p99, memory")
    load.add_argument("--clients", type=int, default=64)
    load.add_argument("--duration", type=float, default=120.0, help="seconds")
    load.add_argument("--max-tokens", type=int, default=32)
    load.add_argument("--store-bytes", type=int, default=64 << 20, help="the server's resident snapshot budget")
    load.add_argument("--max-waiting", type=int, default=32, help="the server's queue bound (429 beyond)")
    load.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if args.bench == "runtime":
        from .runtime import run

        run(sorted(args.contexts), args.baseline_max, args.decode_tokens, args.mag_weight, args.out, args.compile,
            shape=args.shape, device=args.device, dtype=resolve_dtype(args.dtype, args.device), batches=args.batch,
            cache_tokens=args.cache_tokens, cuda_graphs=args.cuda_graphs)
    elif args.bench == "cluster":
        from .cluster import run as run_cluster

        run_cluster(args.turn_tokens, args.reply_tokens, args.trials, args.moves, args.out, args.clients,
                    args.decode_tokens, not args.no_ray)
    elif args.bench == "server":
        from .server import run as run_server

        run_server(args.turn_tokens, args.reply_tokens, args.clients, args.decode_tokens, args.out,
                   resolve_dtype(args.dtype, "cpu"), args.compile)
    elif args.bench == "load":
        from .load import run as run_load

        run_load(args.clients, args.duration, args.max_tokens, args.store_bytes, args.max_waiting, args.out)


if __name__ == "__main__":
    main()
