"""Decode steps replayed as CUDA graphs (cuda_graphs.py), against the same steps run op by op.

The bookkeeping around the graphs (buckets, static input buffers, the rows of a bucket that are not decoding,
recording while requests run, the engine falling back when recording fails) runs on any device with a stand-in
recorder whose replay runs the recorded step again on the same tensors. The real graphs run the same tests on a
CUDA machine (marked `gpu`).
"""

import pytest
import torch

from tests.conftest import tiny_model
from tests.engine.arrivals import serve_staggered
from tptt_runtime.config import TpttConfig
from tptt_runtime.cuda_graphs import GraphedDecode, buckets
from tptt_runtime.engine import EngineConfig, LLMEngine, Request, SamplingParams
from tptt_runtime.engine.state_pool import StatePool
from tptt_runtime.model import TitansModel

CONFIG = TpttConfig(window=4, sinks=2, mag_weight=0.3, cache_tokens=3)


class Rerun:
    """A recorded step whose replay runs the step again, writing into the output of the recording run."""

    def __init__(self, step, output):
        self.step, self.output = step, output

    def replay(self):
        self.output.copy_(self.step())


class RerunRecorder:
    def __call__(self, step):
        output = step()
        return Rerun(step, output), output

    def replay(self, graph):
        graph.replay()


class FailingRecorder(RerunRecorder):
    def __call__(self, step):
        step()
        raise RuntimeError("operation not permitted when stream is capturing")


RECORDERS = [pytest.param("cpu", RerunRecorder(), id="stand-in"),
             pytest.param("cuda", None, id="cuda", marks=[
                 pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def tiny(device):
    return TitansModel(tiny_model("llama").to(device), CONFIG)


def test_buckets_cover_every_batch_size_up_to_the_pool():
    assert buckets(1) == [1]
    assert buckets(5) == [1, 2, 4, 5]
    assert buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert buckets(30) == [1, 2, 4, 8, 16, 24, 30]
    for size in range(1, 41):
        sizes = buckets(size)
        assert sizes[-1] == size and sizes == sorted(set(sizes))


def test_real_graphs_are_refused_off_cuda():
    model = tiny("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        GraphedDecode(model, StatePool(model, 2).layers)


@pytest.mark.parametrize("device, recorder", RECORDERS)
def test_replayed_steps_equal_eager_steps_and_leave_other_rows_alone(device, recorder):
    """3 rows at different positions in a pool of 6 (the graph of bucket 4): logits and states equal the eager
    step's, two steps running; rows 3 .. 5 (other requests') keep their bytes through recording and replays."""
    model = tiny(device)
    pool = StatePool(model, 6)
    for slot in range(6):
        state = model.new_session()
        model.prefill(state, torch.randint(3, 90, (5 + 3 * slot,)))
        assert pool.acquire(state) == slot
    expected = [{name: t.clone() for name, t in layer.items()} for layer in pool.layers]
    ids, positions = torch.tensor([7, 11, 13], device=device), [5, 8, 11]
    graphs = GraphedDecode(model, pool.layers, recorder)
    for _ in range(2):
        eager_rows = [{name: t[:3].clone() for name, t in layer.items()} for layer in expected]
        eager = model.decode_rows(eager_rows, ids, positions)
        replayed = graphs(ids, positions)
        torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=1e-5)
        for layer, stepped, kept in zip(pool.layers, eager_rows, expected):
            for name, tensor in layer.items():
                torch.testing.assert_close(tensor[:3], stepped[name], atol=1e-5, rtol=1e-5)
                assert torch.equal(tensor[3:], kept[name][3:])
                kept[name][:3] = stepped[name]
        positions = [p + 1 for p in positions]
        ids = ids + 1
    assert list(graphs.graphs) == [4]


@pytest.mark.parametrize("device, recorder", RECORDERS)
def test_sink_filling_steps_are_refused_and_new_weights_record_anew(device, recorder):
    model = tiny(device)
    pool = StatePool(model, 2)
    state = model.new_session()
    model.prefill(state, [5, 6, 7])
    pool.acquire(state)
    graphs = GraphedDecode(model, pool.layers, recorder)
    with pytest.raises(ValueError, match="sinks"):
        graphs(torch.tensor([4], device=device), [1])
    graphs(torch.tensor([4], device=device), [3])
    first = graphs.graphs[1]
    model.set_mag_weight(0.9)
    expected = model.decode_rows([{n: t[:1].clone() for n, t in layer.items()} for layer in pool.layers],
                                 torch.tensor([8], device=device), [4])
    torch.testing.assert_close(graphs(torch.tensor([8], device=device), [4]), expected, atol=1e-5, rtol=1e-5)
    assert graphs.graphs[1] is not first


def serve(model, prompts, graphs_for=None):
    """Greedy tokens of 12 requests on 8 slots, half joining mid-decode; `graphs_for(engine)` sets the engine's
    graphs (None: the engine's own choice)."""
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=32, prefix_reuse=False))
    if graphs_for is not None:
        engine.graphs = graphs_for(engine)
    requests = [Request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=6 + i % 3, ignore_eos=True))
                for i, p in enumerate(prompts)]
    outputs = serve_staggered(engine, requests, first=6)
    return engine, {rid: [t for o in outs for t in o.token_ids] for rid, outs in outputs.items()}


PROMPTS = [[3 + (7 * i + j) % 90 for j in range(1 + 2 * i)] for i in range(12)]  # the first fills the sinks


@pytest.mark.parametrize("device, recorder", RECORDERS)
def test_the_engine_serves_the_same_greedy_tokens_with_and_without_graphs(device, recorder):
    model = tiny(device)
    engine, with_graphs = serve(model, PROMPTS, lambda e: GraphedDecode(model, e.pool.layers, recorder))
    assert engine.graphs is not None and len(engine.graphs.graphs) > 1  # several batch sizes ran replayed
    _, eager = serve(model, PROMPTS, lambda e: None)
    assert with_graphs == eager


def test_the_engine_goes_on_op_by_op_when_a_graph_cannot_be_recorded():
    model = tiny("cpu")
    engine, outputs = serve(model, PROMPTS, lambda e: GraphedDecode(model, e.pool.layers, FailingRecorder()))
    assert engine.graphs is None
    assert outputs == serve(model, PROMPTS, lambda e: None)[1]


def test_the_engine_records_graphs_only_for_a_cuda_model_and_only_when_asked():
    model = tiny("cpu")
    assert LLMEngine(model, EngineConfig(cuda_graphs=True)).graphs is None
    if torch.cuda.is_available():
        cuda_model = tiny("cuda")
        assert LLMEngine(cuda_model, EngineConfig(cuda_graphs=True)).graphs is not None
        assert LLMEngine(cuda_model, EngineConfig(cuda_graphs=False)).graphs is None
