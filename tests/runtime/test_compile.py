"""TitansModel.compile(): decode steps through one torch.compile graph give the eager logits, batch 1 and
batched, sessions at different positions, and the graph has no breaks (one graph per batch shape)."""

import pytest
import torch
from torch._dynamo.utils import counters

from tests.conftest import tiny_model
from tptt_runtime import TitansModel, TpttConfig

TOL = 5e-4  # eager incremental decode is held to 1e-4; inductor's fused kernels reorder float32 reductions
#             (measured: up to 1.0e-4 on this model, and the order depends on the CPU's vector width)


def ids(n, seed):
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cache_tokens", [0, 3])
def test_compiled_decode_equals_forward_full(cache_tokens):
    torch._dynamo.reset()
    counters.clear()
    config = TpttConfig(window=4, sinks=2, mag_gate="learned", mag_weight=0.3, feature_map="learned",
                        nonlinear_chunk=4, cache_tokens=cache_tokens)
    model = TitansModel(tiny_model("llama"), config)
    model.compile()
    streams = [ids(16, seed=s) for s in range(3)]
    full = [model.forward_full(t) for t in streams]
    states = [model.new_session() for _ in streams]
    for state, stream, n in zip(states, streams, (6, 1, 3)):  # session 1 decodes its sinks (eager steps)
        model.prefill(state, stream[:n])

    def decode(members):
        tokens = [int(streams[m][states[m].num_tokens]) for m in members]
        logits = model.decode([states[m] for m in members], tokens)
        for m, row in zip(members, logits):
            torch.testing.assert_close(row, full[m][states[m].num_tokens - 1], atol=TOL, rtol=0)

    for _ in range(3):
        decode([0])
    for _ in range(4):
        decode([0, 1, 2])
    decode([1, 2])
    decode([2])
    assert counters["stats"]["unique_graphs"] == 2  # batch 1, then a dynamic batch dim for the rest
    assert not counters["graph_break"]
