"""TitansModel.compile(): decode steps through one ahead-of-time compiled graph (compiled.py) give the eager
logits, batch 1 and batched, sessions at different positions; the graph is saved, and a later process loads it
rather than tracing again."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import tiny_model
from tptt_runtime import TitansModel, TpttConfig
from tptt_runtime.compiled import CompiledDecode, artifact_key, decode_forward

TOL = 5e-4  # eager incremental decode is held to 1e-4; inductor's fused kernels reorder float32 reductions
#             (measured: up to 1.0e-4 on this model, and the order depends on the CPU's vector width)
BF16_TOL = 0.02  # of the largest logit (measured: 0.005; bfloat16 roundings through two layers)


def ids(n, seed):
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed))


def config(cache_tokens=3, cache_pool=0):
    return TpttConfig(window=4, sinks=2, mag_gate="learned", mag_weight=0.3, feature_map="learned",
                      nonlinear_chunk=4, cache_tokens=cache_tokens, cache_pool=cache_pool)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled")


@pytest.mark.parametrize("cache_tokens,cache_pool", [(0, 0), (3, 0), (3, 2)])
def test_compiled_decode_equals_forward_full(cache_tokens, cache_pool, cache_dir):
    torch._dynamo.reset()
    model = TitansModel(tiny_model("llama"), config(cache_tokens, cache_pool))
    model.compile(cache_dir)
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
    assert model._compiled_decode.built and model._compiled_decode.path.is_file()  # one graph, every batch size


LOAD_IN_A_NEW_PROCESS = """
    import sys, torch
    from tests.conftest import tiny_model
    from tests.runtime.test_compile import config, ids
    from tptt_runtime import TitansModel
    model = TitansModel(tiny_model("llama"), config())
    model.compile(sys.argv[1])
    stream = ids(12, seed=4)
    full = model.forward_full(stream)
    states = [model.new_session() for _ in range(2)]
    for state in states:
        model.prefill(state, stream[:6])
    rows = model.decode(states, [int(stream[6])] * 2)
    assert not model._compiled_decode.built, "traced again instead of loading"
    torch.testing.assert_close(rows, full[6].expand(2, -1), atol=5e-4, rtol=0)
    print("loaded")
"""


def test_a_later_process_loads_the_graph_instead_of_tracing(cache_dir):
    model = TitansModel(tiny_model("llama"), config())
    model.compile(cache_dir)
    model.warm_up()  # built here, or loaded if test_compiled_decode_equals_forward_full[3] built it
    assert model._compiled_decode.path.is_file()
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_IN_A_NEW_PROCESS), str(cache_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-3000:]


def test_new_weights_or_config_get_their_own_graph(cache_dir, monkeypatch):
    """Only tensor guards are kept, so a graph traced for one mu must not serve another (set_mag_weight
    changes mu in place, as training schedules do): the next step asks for the new key's graph (here an eager
    stand-in, to spare the suite a second compile)."""
    model = TitansModel(tiny_model("llama"), config())
    model.compile(cache_dir)
    model.warm_up()
    first = model._compiled_decode.path
    model.set_mag_weight(0.7)
    asked = []

    def build(self, *example):
        asked.append(self.path)
        return decode_forward

    monkeypatch.setattr(CompiledDecode, "_build", build)
    stream = ids(10, seed=5)
    state = model.new_session()
    model.prefill(state, stream[:6])
    torch.testing.assert_close(model.step(state, int(stream[6])), model.forward_full(stream)[6], atol=TOL, rtol=0)
    assert asked == [model._compiled_decode.path] and asked[0] != first


def test_the_artifact_key_follows_weights_config_and_dtype():
    model = TitansModel(tiny_model("llama"), config())
    others = [TitansModel(tiny_model("llama", seed=1), config()), TitansModel(tiny_model("llama"), config(0)),
              TitansModel(tiny_model("llama").to(torch.bfloat16), config())]
    assert artifact_key(model) == artifact_key(TitansModel(tiny_model("llama"), config()))
    assert len({artifact_key(m) for m in [model, *others]}) == 4


def test_a_broken_artifact_is_not_loaded(tmp_path):
    model = TitansModel(tiny_model("llama"), config())
    compiled = CompiledDecode(model, tmp_path)
    compiled.path.parent.mkdir(parents=True)
    compiled.path.write_bytes(b"not a graph")
    assert compiled._load() is None  # and the first call then builds it again


def test_compiled_bfloat16_decode_equals_eager_bfloat16(cache_dir):
    """What `make serve` runs on a CPU with native bfloat16 (`--dtype auto --compile`): the compiled step gives
    the eager bfloat16 step's logits up to bfloat16 rounding (inductor keeps fused intermediates in float32
    where eager rounds every operation to bfloat16)."""
    torch._dynamo.reset()
    eager = TitansModel(tiny_model("llama").to(torch.bfloat16), config())
    compiled = copy.deepcopy(eager)
    compiled.compile(cache_dir)
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
