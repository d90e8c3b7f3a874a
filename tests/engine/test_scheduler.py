"""Scheduler without a model: a fake runner advances requests the way the engine's forwards would (a prefill
chunk consumes prompt tokens, a decode appends one token), and every step is checked against the policy:
decode rows and prefill chunks share the token budget, admission is first come first served up to
max_num_seqs, a prompt identical to one still prefilling waits for its snapshot."""

from tptt_runtime.engine.request import Request
from tptt_runtime.engine.sampling import SamplingParams
from tptt_runtime.engine.scheduler import Scheduler


def request(name, prompt_len, max_tokens=3, prompt=None):
    """A request of `prompt_len` tokens whose prompt differs from every other name's (or `prompt`)."""
    prompt = prompt or [1000 + sum(map(ord, name))] + list(range(2, prompt_len + 1))
    return Request(name, prompt, SamplingParams(max_tokens=max_tokens, seed=0))


class FakeRunner:
    """What the engine does with a ScheduledBatch, minus the model: advance, sample token 7, finish."""

    def __init__(self, scheduler):
        self.scheduler, self.admitted, self.steps = scheduler, [], []

    def admit(self, req):
        self.admitted.append(req.request_id)

    def step(self):
        batch = self.scheduler.schedule()
        self.steps.append(batch)
        for req, num_tokens in batch.prefills:
            req.num_computed += num_tokens
        for req in [r for r, _ in batch.prefills if not r.is_prefill] + batch.decodes:
            req.output_ids.append(7)
            if len(req.output_ids) >= req.params.max_tokens:
                self.scheduler.finish(req)
        return batch


def make(max_num_seqs=4, budget=16, **kwargs):
    runner = FakeRunner(None)
    runner.scheduler = Scheduler(max_num_seqs, budget, runner.admit, **kwargs)
    return runner


def test_decode_rows_and_prefill_chunks_share_the_budget_first_come_first_served():
    runner = make(budget=16)
    a, b, c = request("a", 20), request("b", 10), request("c", 3)
    for req in (a, b, c):
        runner.scheduler.add(req)
    first = runner.step()
    assert [(r.request_id, n) for r, n in first.prefills] == [("a", 16)] and not first.decodes
    second = runner.step()
    assert [(r.request_id, n) for r, n in second.prefills] == [("a", 4), ("b", 10), ("c", 2)]
    third = runner.step()  # a and b decode (one token each), c's last prompt token fits beside them
    assert [r.request_id for r in third.decodes] == ["a", "b"]
    assert [(r.request_id, n) for r, n in third.prefills] == [("c", 1)]
    for batch in runner.steps:
        assert len(batch.decodes) + sum(n for _, n in batch.prefills) <= 16


def test_admission_stops_at_max_num_seqs_and_a_finished_request_makes_room():
    runner = make(max_num_seqs=2, budget=64)
    requests = [request(f"r{i}", 4, max_tokens=1 + i) for i in range(4)]
    for req in requests:
        runner.scheduler.add(req)
    runner.step()
    assert runner.admitted == ["r0", "r1"] and len(runner.scheduler.waiting) == 2
    while runner.scheduler.has_work():
        runner.step()
        assert len(runner.scheduler.running) <= 2
    assert runner.admitted == ["r0", "r1", "r2", "r3"]  # each admitted exactly once, in order
    assert all(len(r.output_ids) == r.params.max_tokens for r in requests)


def test_an_identical_prompt_waits_while_its_twin_prefills_unless_reuse_is_off():
    prompt = list(range(1, 41))
    runner = make(budget=16)
    twin_a, twin_b = request("a", 0, prompt=prompt), request("b", 0, prompt=list(prompt))
    runner.scheduler.add(twin_a)
    runner.scheduler.add(twin_b)
    runner.step()
    assert runner.admitted == ["a"] and list(runner.scheduler.waiting) == [twin_b]
    while twin_a.is_prefill:
        runner.step()
    runner.step()
    assert runner.admitted == ["a", "b"]

    eager = make(budget=16, wait_for_duplicates=False)
    eager.scheduler.add(request("a", 0, prompt=prompt))
    eager.scheduler.add(request("b", 0, prompt=list(prompt)))
    eager.step()
    assert eager.admitted == ["a", "b"]


def test_finish_removes_a_waiting_or_running_request():
    runner = make(max_num_seqs=1, budget=8)
    running, waiting = request("run", 4), request("wait", 4)
    runner.scheduler.add(running)
    runner.scheduler.add(waiting)
    runner.step()
    runner.scheduler.finish(waiting)
    runner.scheduler.finish(running)
    assert not runner.scheduler.has_work()


def test_prefill_runs_batch_requests_in_consecutive_slots_at_one_position_taking_as_many_tokens():
    """engine.prefill_runs: which of a step's prefill chunks one batched piece of a packed prefill carries."""
    from types import SimpleNamespace

    from tptt_runtime.engine.engine import prefill_runs

    def chunk(slot, start, tokens, logprobs=False):
        return SimpleNamespace(slot=slot, num_computed=start, wants_prompt_logprobs=logprobs), tokens

    chunks = [chunk(3, 0, 64), chunk(1, 0, 64), chunk(2, 0, 64), chunk(5, 0, 64),  # 1-3 a run, 5 not next to 3
              chunk(4, 0, 30), chunk(6, 12, 64), chunk(7, 0, 64, logprobs=True), chunk(0, 0, 64)]
    runs = [[(request.slot, tokens) for request, tokens in run] for run in prefill_runs(chunks)]
    assert sorted(runs) == sorted([[(0, 64), (1, 64), (2, 64), (3, 64)], [(5, 64)], [(4, 30)], [(6, 64)], [(7, 64)]])
    assert sorted(slot for run in runs for slot, _ in run) == list(range(8))
