"""TitansModel.compile(): decode steps through one torch.compile graph give the eager logits, batch 1 and
batched, sessions at different positions, and the graph has no breaks (one graph per batch shape)."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from tests.conftest import tiny_model
from tptt_runtime import TitansModel, TpttConfig

TOL = 5e-4  # eager incremental decode is held to 1e-4; inductor's fused kernels reorder float32 reductions
#             (measured: up to 1.0e-4 on this model, and the order depends on the CPU's vector width)
BF16_TOL = 0.02  # of the largest logit (measured: 0.005; bfloat16 roundings through two layers)


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


def test_compiled_bfloat16_decode_equals_eager_bfloat16():
    """What `make serve` runs on a CPU with native bfloat16 (`--dtype auto --compile`): the compiled step gives
    the eager bfloat16 step's logits up to bfloat16 rounding (inductor keeps fused intermediates in float32
    where eager rounds every operation to bfloat16)."""
    torch._dynamo.reset()
    config = TpttConfig(window=4, sinks=2, mag_gate="learned", mag_weight=0.3, feature_map="learned", cache_tokens=3)
    eager = TitansModel(tiny_model("llama").to(torch.bfloat16), config)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    streams = [ids(14, seed=s) for s in range(2)]
    sessions = {m: [m.new_session() for _ in streams] for m in (eager, compiled)}
    for model, states in sessions.items():
        for state, stream in zip(states, streams):
            model.prefill(state, stream[:6])
    for position in range(6, 14):
        tokens = [int(s[position]) for s in streams]
        expected, got = (m.decode(sessions[m], tokens) for m in (eager, compiled))
        assert expected.dtype == torch.float32 and sessions[compiled][0].layers[0]["memory"].dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=BF16_TOL * expected.abs().max().item(), rtol=0)
