"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket, over the rows of a state pool (CUDA only).

A one-token step of a small model on a GPU is bound by kernel launches, not by the GPU: some hundred small
kernels a layer, each launched from Python. A CUDA graph records the launches of one step once and replays
them with one call. A graph is fixed to the addresses it was recorded on, so it is recorded over fixed tensors:
the first `bucket` rows of the pool's per-layer state tensors (the engine keeps the decoding requests in rows
0 .. B-1, engine/state_pool.py), and input buffers for the token ids and positions that each call fills.

B rows run in the graph of the smallest bucket >= B (1, 2, 4, 8, then multiples of 8 up to the pool's size).
The bucket's other rows may belong to requests that are not decoding (prefilling) or to no request: the step
computes them too, so they are saved before the replay and put back after it. They decode at position `sinks`
(never a sink-filling step, which the caller keeps eager).

Recording runs the step three times on the recorded rows (two warm-ups and the capture): they are saved
before and restored after, so a graph can be recorded while requests are running. All graphs share one memory
pool. Where recording fails (an operation CUDA graphs cannot hold), `RecordingFailed` says so and the engine
goes on op by op. The graphs belong to one model: a model with other weights (or its compiled twin) needs its own
`GraphedDecode`.
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
    """Turns a step into (graph, output): two warm-ups on a side stream (lazy initialisations, cuBLAS
    workspaces), then the capture. Every graph it records shares one memory pool."""

    def __init__(self):
        self.memory_pool = torch.cuda.graph_pool_handle()

    def __call__(self, step):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory_pool):
            output = step()
        return graph, output


class GraphedDecode:
    """`recorder`: how a step becomes something to replay; by default CUDA graphs (tests pass a stand-in that
    replays by running the step again, to check the bookkeeping around the graphs on any device)."""

    def __init__(self, model, pool_layers: list[dict[str, torch.Tensor]], recorder=None):
        if recorder is None:
            if model.device.type != "cuda":
                raise ValueError("CUDA graphs need a model on a CUDA device")
            recorder = CudaRecorder()
        self.model = model
        self.pool_layers = pool_layers
        self.recorder = recorder
        self.max_rows = next(iter(pool_layers[0].values())).shape[0]
        self.buckets = buckets(self.max_rows)
        self.ids = torch.zeros(self.max_rows, 1, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(self.max_rows, dtype=torch.long, device=model.device)
        self.graphs: dict[int, tuple] = {}

    def bucket(self, rows: int) -> int:
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"{rows} rows; the pool has {self.max_rows}")
        return next(b for b in self.buckets if b >= rows)

    @torch.no_grad()
    def __call__(self, token_ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One token for pool rows 0 .. B-1 (B = len(positions)), states updated in place: float32 logits [B,
        vocab], a tensor of its own (the next replay does not overwrite it)."""
        rows = len(positions)
        bucket = self.bucket(rows)
        graph, logits = self.graphs.get(bucket) or self._record(bucket)
        self.ids[:rows, 0].copy_(token_ids.reshape(-1))
        self.positions[:rows].copy_(torch.tensor(positions))
        self.positions[rows:bucket].fill_(self.model.config.sinks)
        others = self._save(rows, bucket)
        graph.replay()
        self._restore(rows, others)
        return logits[:rows].clone()

    def _rows(self, start: int, stop: int) -> list[dict[str, torch.Tensor]]:
        return [{name: tensor[start:stop] for name, tensor in layer.items()} for layer in self.pool_layers]

    def _save(self, start: int, stop: int):
        return [{name: t.clone() for name, t in layer.items()} for layer in self._rows(start, stop)]

    def _restore(self, start: int, saved) -> None:
        for layer, kept in zip(self.pool_layers, saved):
            for name, tensor in layer.items():
                rows = kept[name]
                if rows.shape[0]:
                    tensor[start:start + rows.shape[0]].copy_(rows)

    def _record(self, bucket: int):
        """Record the bucket's step; the runs that recording makes change the rows, which are put back."""
        saved = self._save(0, bucket)
        self.positions[:bucket].fill_(self.model.config.sinks)
        layers, ids, positions = self._rows(0, bucket), self.ids[:bucket], self.positions[:bucket]
        try:
            self.graphs[bucket] = self.recorder(lambda: self.model.decode_logits(layers, ids, positions))
        except Exception as error:
            raise RecordingFailed(f"could not record the decode step of {bucket} rows as a CUDA graph") from error
        finally:
            self._restore(0, saved)
        return self.graphs[bucket]
