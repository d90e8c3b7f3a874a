"""The decode step compiled ahead of time and kept on disk, so that the next process loads it in seconds.

`CompiledDecode(model)` runs a TitansModel's one-token decode forward through one graph that
`torch.compile(fullgraph=True).aot_compile` builds (Dynamo, AOTAutograd, Inductor) with the batch dim dynamic,
so it serves every batch size. The graph is saved with `save_compiled_function`; a later process loads it with
`torch.compiler.load_compiled_function`, which runs none of the compiler's stages again (measured on 2 cores: a
warm start of `tptt-serve --compile` reached compiled decode after 63 s with plain torch.compile and its
on-disk caches, 13.8 s loading the saved graph).

The graph takes the Hugging Face module as an argument, so the weights are its inputs, not constants: an
artifact holds no weights. Only tensor guards are kept (shape, dtype and device of the ids, positions and state
tensors); what the other guards would check goes into the artifact's key instead: the model's fingerprint
(weights, adapter, config), its dtype and device, the CPU's vector capability, the versions of Python, torch
and transformers, and a hash of this package's source. A changed key builds a new artifact; one that fails to
load is rebuilt. Inductor's compiled kernels live in its own cache, which must persist beside the artifacts:
unless TORCHINDUCTOR_CACHE_DIR is set, it goes under the same directory.

On a CPU the graph's wrapper (the code that calls its ~700 kernels and matmuls each step) is C++ rather than
Python (Inductor's cpp_wrapper): measured on 2 cores with the default model, a step took 46-48 ms at one row
and 87-92 ms at 16 against 58-62 and 107-110 with the Python wrapper; the cold build takes ~20 minutes
instead of ~7.5 (the wrapper is one large C++ file), a warm load 2.7 s.

The directory: `cache_dir`, else $TPTT_COMPILE_CACHE, else ~/.cache/tptt/compiled.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch
import transformers

log = logging.getLogger(__name__)

ARTIFACT = "decode.bin"


def run_forward(hf, context, ids: torch.Tensor, layer_states=None, positions: torch.Tensor | None = None,
                filling_sinks: bool = False, pieces=None, logits_to_keep: int | torch.Tensor = 1) -> torch.Tensor:
    """One Hugging Face forward of ids [B, T] with `context` set for the LiZA layers around it, eager or
    compiled; every TitansModel forward goes through here. Three kinds: a decode step (`layer_states` with
    `positions`), a packed prefill (`pieces`, layers/liza.py PrefillPiece, ids [1, N]), or neither: a stateless
    forward from token 0. `logits_to_keep` is Hugging Face's: the last n positions (0: all) or an index tensor.
    Returns the logits [B, kept, vocab] in the model's dtype."""
    if layer_states is not None and positions is None:
        raise ValueError("session states without positions: a stateful prefill goes through prefill_packed")
    context.layer_states, context.positions = layer_states, positions
    context.filling_sinks, context.pieces = filling_sinks, pieces
    try:
        out = hf(input_ids=ids, use_cache=False, logits_to_keep=logits_to_keep)
    finally:
        context.reset()
    return out.logits


def decode_forward(hf, context, ids: torch.Tensor, layer_states, positions: torch.Tensor) -> torch.Tensor:
    """What the artifact traces: one token per row, ids [B, 1], positions [B], past the sinks."""
    return run_forward(hf, context, ids, layer_states, positions=positions)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TPTT_COMPILE_CACHE") or Path.home() / ".cache" / "tptt" / "compiled")


@functools.cache
def source_hash() -> str:
    """sha256 of this package's Python source: the traced code, which no kept guard checks."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def artifact_key(model) -> str:
    """Everything a graph traced from `model` depends on besides the shapes its tensor guards check."""
    parts = [model.fingerprint, str(model.dtype), model.device.type, torch.backends.cpu.get_cpu_capability(),
             sys.version, torch.__version__, transformers.__version__, source_hash()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


class CompiledDecode:
    """A TitansModel's decode forward through its on-disk compiled graph, loaded or built on the first call and
    again whenever the model's fingerprint has changed since (training changes weights or mu in place)."""

    def __init__(self, model, cache_dir: str | Path | None = None):
        self.model = model
        self.root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.root / "inductor"))
        self.built = False  # whether this process traced the graph (False: it was loaded from disk)
        self._graph, self._fingerprint = None, None

    @property
    def path(self) -> Path:
        return self.root / artifact_key(self.model) / ARTIFACT

    def __call__(self, ids: torch.Tensor, layer_states, positions: torch.Tensor) -> torch.Tensor:
        if self._fingerprint != self.model.fingerprint:  # first call, or new weights / config (training)
            self._graph = self._load() or self._build(ids, layer_states, positions)
            self._fingerprint = self.model.fingerprint
        return self._graph(self.model.hf, self.model.context, ids, layer_states, positions)

    def _load(self):
        path = self.path
        if not path.exists():
            return None
        try:
            with path.open("rb") as f:
                return torch.compiler.load_compiled_function(f)
        except Exception:  # noqa: BLE001 - a stale or broken artifact is rebuilt, never fatal
            log.warning("could not load the compiled decode step %s; compiling it again", path, exc_info=True)
            return None

    def _build(self, ids: torch.Tensor, layer_states, positions: torch.Tensor):
        """Trace on copies of the inputs (at least 2 rows: batch 1 would be specialized) with the batch dim
        marked dynamic, compile, save atomically."""
        rows = max(2, ids.shape[0])
        example_ids, example_positions = ids[:1].expand(rows, -1).clone(), positions[:1].expand(rows).clone()
        example_states = [{name: t[:1].expand(rows, *t.shape[1:]).clone() for name, t in layer.items()}
                          for layer in layer_states]
        for tensor in (example_ids, example_positions, *(t for layer in example_states for t in layer.values())):
            torch._dynamo.mark_dynamic(tensor, 0)
        options = {"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe,
                   "cpp_wrapper": self.model.device.type == "cpu"}  # see the module docstring
        compiler = torch.compile(decode_forward, fullgraph=True, options=options)
        graph = compiler.aot_compile(((self.model.hf, self.model.context, example_ids, example_states,
                                       example_positions), {}))
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        graph.save_compiled_function(str(path))
        self.built = True
        log.info("compiled the decode step into %s", path)
        return graph
