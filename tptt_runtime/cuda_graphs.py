"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket, over the rows of a state pool (CUDA only).

A one-token step of a small model on a GPU is bound by kernel launches, not by the GPU: some hundred small
kernels a layer, each launched from Python. A CUDA graph records the launches of one step once and replays
them with one call. A graph is fixed to the addresses it was recorded on, so it is recorded over fixed tensors:
the first `bucket` rows of the pool's per-layer state tensors (the engine keeps the decoding requests in rows
0 .. B-1, engine/state_pool.py), and input buffers for the token ids, positions and which rows are active.

B rows run in the graph of the smallest bucket >= B (1, 2, 4, 8, then multiples of 8 up to the pool's size).
The bucket's other rows may belong to requests that are not decoding (prefilling) or to no request: the
recorded step copies the bucket's rows first and puts the inactive ones back after the step, inside the graph
(a few megabytes of device copies rather than hundreds of launches from Python). Inactive rows decode at
position `sinks`. Steps that fill the sinks are refused (the engine runs them op by op).

Recording runs the step three times with every row inactive (two warm-ups on a side stream, then the capture
on the model's device, in thread-local capture mode so that a compile running on another thread does not
break it); the rows are saved first and restored if anything fails. A failure raises `RecordingFailed` (the
engine then decodes op by op) or, for lack of memory, `torch.OutOfMemoryError`. All graphs share one memory
pool; each replay's logits are cloned before another graph replays, which is what makes sharing it safe. The
graphs belong to one set of weights: a changed fingerprint (training) records them again.
"""

from __future__ import annotations

import torch


def buckets(max_rows: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8, and `max_rows` itself."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 8))
    return sorted(set(sizes + [max_rows]))


class RecordingFailed(RuntimeError):
    """A step could not be recorded (the rows are as they were): the caller goes on without graphs."""


class CudaRecorder:
    """Turns a step into (graph, output) on `device`: two warm-ups on a side stream (lazy initialisations,
    cuBLAS workspaces), then the capture. Every graph it records shares one memory pool."""

    def __init__(self, device: torch.device):
        self.device = device
        with torch.cuda.device(device):
            self.memory_pool = torch.cuda.graph_pool_handle()

    def __call__(self, step):
        with torch.cuda.device(self.device):
            main, side = torch.cuda.current_stream(), torch.cuda.Stream()
            side.wait_stream(main)
            try:
                with torch.cuda.stream(side):
                    for _ in range(2):
                        step()
            finally:
                main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.memory_pool, capture_error_mode="thread_local"):
                    output = step()
            finally:
                torch.cuda.set_stream(main)  # a capture that fails can leave its own stream current
        return graph, output

    def replay(self, graph) -> None:
        with torch.cuda.device(self.device):
            graph.replay()


class GraphedDecode:
    """`recorder`: how a step becomes something to replay; by default CUDA graphs (tests pass a stand-in that
    replays by running the step again, to check the bookkeeping around the graphs on any device)."""

    def __init__(self, model, pool_layers: list[dict[str, torch.Tensor]], recorder=None):
        if recorder is None:
            if model.device.type != "cuda":
                raise ValueError("CUDA graphs need a model on a CUDA device")
            recorder = CudaRecorder(model.device)
        self.model = model
        self.pool_layers = pool_layers
        self.recorder = recorder
        self.max_rows = next(iter(pool_layers[0].values())).shape[0]
        self.buckets = buckets(self.max_rows)
        self.ids = torch.zeros(self.max_rows, 1, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(self.max_rows, dtype=torch.long, device=model.device)
        self.active = torch.zeros(self.max_rows, dtype=torch.bool, device=model.device)
        self.graphs: dict[int, tuple] = {}
        self.fingerprint = model.fingerprint

    def bucket(self, rows: int) -> int:
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"{rows} rows; the pool has {self.max_rows}")
        return next(b for b in self.buckets if b >= rows)

    @torch.no_grad()
    def __call__(self, token_ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One token for pool rows 0 .. B-1 (B = len(positions), every one past the sinks), states updated in
        place: float32 logits [B, vocab], a tensor of its own (the next replay does not overwrite it)."""
        if min(positions) < self.model.config.sinks:
            raise ValueError("a row still fills the sinks: run this step op by op")
        if self.fingerprint != self.model.fingerprint:  # new weights or config since the graphs were recorded
            self.graphs, self.fingerprint = {}, self.model.fingerprint
        rows = len(positions)
        bucket = self.bucket(rows)
        if bucket not in self.graphs:
            self._record(bucket)
        graph, logits = self.graphs[bucket]
        self.ids[:rows, 0].copy_(token_ids.reshape(-1))
        self.positions[:rows].copy_(torch.tensor(positions))
        self.positions[rows:bucket].fill_(self.model.config.sinks)
        self.active[:rows] = True
        self.active[rows:bucket] = False
        self.recorder.replay(graph)
        return logits[:rows].clone()

    def _step(self, bucket: int) -> torch.Tensor:
        """What a graph records: the decode step of the bucket's rows, then the inactive rows put back."""
        layers = [{name: tensor[:bucket] for name, tensor in layer.items()} for layer in self.pool_layers]
        before = [{name: tensor.clone() for name, tensor in layer.items()} for layer in layers]
        logits = self.model.decode_logits(layers, self.ids[:bucket], self.positions[:bucket])
        active = self.active[:bucket]
        for layer, kept in zip(layers, before):
            for name, tensor in layer.items():
                tensor.copy_(torch.where(active.view(-1, *[1] * (tensor.dim() - 1)), tensor, kept[name]))
        return logits

    def _record(self, bucket: int) -> None:
        saved = [{name: tensor[:bucket].clone() for name, tensor in layer.items()} for layer in self.pool_layers]
        self.positions[:bucket].fill_(self.model.config.sinks)
        self.active[:bucket] = False  # the recording runs change no row
        try:
            self.graphs[bucket] = self.recorder(lambda: self._step(bucket))
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            raise RecordingFailed(f"could not record the decode step of {bucket} rows as a CUDA graph") from error
        finally:
            for layer, kept in zip(self.pool_layers, saved):
                for name, tensor in layer.items():
                    tensor[:bucket].copy_(kept[name])
