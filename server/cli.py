"""`tptt-serve` (also `python -m server`): settings -> model -> app -> uvicorn."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import torch
import uvicorn

import tptt_runtime as tr
from tptt_runtime.loading import resolve_dtype

from .app import create_app
from .settings import Settings


def load_model(settings: Settings) -> tr.TitansModel:
    """The model `settings` ask for, on their device and dtype (eager: --compile compiles a copy in the
    background once serving, server/app.py)."""
    dtype = resolve_dtype(settings.dtype, settings.device)
    logging.getLogger("tptt-serve").info("loading %s (%s weights on %s)", settings.model,
                                         str(dtype).removeprefix("torch."), settings.device)
    return tr.load(settings.model, device=settings.device, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = Settings.from_args(argv)
    except ValueError as error:
        sys.exit(f"tptt-serve: {error}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.cluster:
        from .cluster import serve_cluster

        serve_cluster(settings)
        return
    # torch's CPU work belongs to the engine thread: this thread stays single-threaded, so that it never holds
    # an OpenMP team of its own beside the engine thread's (AsyncEngine's docstring)
    settings = replace(settings, threads=settings.threads or torch.get_num_threads())
    torch.set_num_threads(1)
    try:
        model = load_model(settings)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"tptt-serve: cannot load {settings.model!r}: {error}")
    app = create_app(settings, model)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=5)
