"""Sampler: each transformation against a direct, per-token reference, and seeded reproducibility."""

import math

import pytest
import torch

from tptt_runtime.engine.sampling import SamplingParams, new_generator, process_logits, sample, token_logprobs, truncate

VOCAB = 50


def logits(seed=0):
    torch.manual_seed(seed)
    return torch.randn(VOCAB) * 3


def kept(row: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(row.tolist()) if v != float("-inf")}


def test_top_k_keeps_exactly_the_k_best():
    row = logits()
    expected = set(sorted(range(VOCAB), key=lambda i: -row[i].item())[:7])
    assert kept(truncate(row, SamplingParams(top_k=7))) == expected


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    row = logits(1)
    probs = row.softmax(-1).tolist()
    order = sorted(range(VOCAB), key=lambda i: -probs[i])
    expected, mass = set(), 0.0
    for i in order:
        expected.add(i)
        mass += probs[i]
        if mass >= 0.8:
            break
    assert kept(truncate(row, SamplingParams(top_p=0.8))) == expected


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    row = logits(2)
    probs = row.softmax(-1)
    expected = {i for i in range(VOCAB) if probs[i] >= 0.1 * probs.max()}
    assert kept(truncate(row, SamplingParams(min_p=0.1))) == expected


def test_temperature_scales_logits():
    row = logits(3)
    assert torch.allclose(truncate(row, SamplingParams(temperature=0.5)), row / 0.5)


def test_penalties_match_their_definitions():
    row = logits(4)
    prompt, output = [1, 2], [3, 3, 4]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5,
                            logit_bias={5: 10.0})
    out = process_logits(row, params, prompt, output)
    for i in range(VOCAB):
        value = row[i].item() + (10.0 if i == 5 else 0.0)
        if i in (1, 2, 3, 4):
            value = value / 1.5 if value > 0 else value * 1.5
        count = output.count(i)
        value -= 0.25 * count + (0.5 if count else 0.0)
        assert math.isclose(out[i].item(), value, rel_tol=1e-6, abs_tol=1e-6)


def test_greedy_is_argmax_and_logprobs_are_raw():
    row = logits(5)
    token, info = sample(row, SamplingParams(temperature=0, logprobs=3), new_generator(0), [], [])
    assert token == int(row.argmax())
    assert math.isclose(info.logprob, row.log_softmax(-1)[token].item(), rel_tol=1e-6)
    assert len(info.top) == 3 and token in info.top and info.top[token] == info.logprob


def test_same_seed_same_draws_different_seed_different_draws():
    row = logits(6)
    params = SamplingParams(temperature=1.5, seed=11)

    def draws(seed):
        generator = new_generator(seed)
        return [sample(row, params, generator, [], [])[0] for _ in range(30)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


def test_sampling_follows_the_distribution():
    row = torch.tensor([0.0, math.log(3.0)] + [-1e9] * 3)
    generator = new_generator(0)
    counts = torch.zeros(5)
    for _ in range(2000):
        counts[sample(row, SamplingParams(), generator, [], [])[0]] += 1
    assert counts[2:].sum() == 0
    assert 0.70 < counts[1] / 2000 < 0.80


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.5),
                                 dict(max_tokens=-1), dict(presence_penalty=3), dict(logprobs=21), dict(stop=[""])])
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_out_of_vocab_bias_is_refused():
    with pytest.raises(ValueError, match="vocabulary"):
        SamplingParams(logit_bias={VOCAB: 1.0}).check_vocab(VOCAB)


def test_a_top_p_too_small_for_float32_keeps_the_best_token():
    """top_p = 5e-324 (a fuzzer's value) is 0 in float32: every token used to be dropped, and the draw failed."""
    row = logits(3)
    assert kept(truncate(row, SamplingParams(top_p=5e-324))) == {int(row.argmax())}
    token, _ = sample(row, SamplingParams(top_p=5e-324), new_generator(0), [], [])
    assert token == int(row.argmax())


@pytest.mark.parametrize("extreme", [dict(temperature=5e-324), dict(repetition_penalty=5e-324),
                                     dict(temperature=1e-40, top_p=0.5, min_p=0.1)])
def test_valid_but_extreme_values_overflowing_float32_still_draw_a_best_token(extreme):
    """A tiny temperature or repetition penalty (fuzzers' values) turns the best logits into float32 inf, and
    the softmax of inf is nan: the draw failed. The overflowed tokens now tie as the best."""
    row, seen, params = logits(4), list(range(0, VOCAB, 2)), SamplingParams(**extreme)
    overflowed = process_logits(row, params, seen, []) / params.temperature
    best = {i for i, v in enumerate(overflowed.tolist()) if v == math.inf}
    assert best  # the case does overflow
    for seed in range(5):
        token, _ = sample(row, SamplingParams(seed=seed, **extreme), new_generator(seed), seen, [])
        assert token in best


# ---- the batched sampler (what the engine runs) against the per-row reference above

from tptt_runtime.engine.sampling import _process_batch, _sorted_truncation, sample_batch  # noqa: E402


def truncate_batch(logits, params):
    """The batched truncation in vocabulary order (-inf where dropped), to compare with `truncate` row by row."""
    masked, order = _sorted_truncation(logits, params)
    return torch.full_like(logits, -math.inf).scatter(-1, order, masked)

MIXED = [SamplingParams(temperature=0), SamplingParams(top_k=7, temperature=0.7),
         SamplingParams(top_p=0.8, min_p=0.05), SamplingParams(top_k=12, top_p=0.6, temperature=1.3),
         SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5, logit_bias={5: 10.0},
                        min_p=0.2),
         SamplingParams(temperature=0, logit_bias={3: -100.0, 7: 4.0}, repetition_penalty=0.8)]
PROMPTS, OUTPUTS = [[1, 2], [], [9], [4, 4], [1, 2], [3, 8]], [[3, 3, 4], [], [], [6], [3, 3, 4], [7]]


def test_batched_processing_and_truncation_equal_the_reference_row_by_row():
    rows = torch.stack([logits(seed) for seed in range(len(MIXED))])
    processed = _process_batch(rows, MIXED, PROMPTS, OUTPUTS)
    for i, params in enumerate(MIXED):
        torch.testing.assert_close(processed[i], process_logits(rows[i], params, PROMPTS[i], OUTPUTS[i]))
    drawn = [i for i, p in enumerate(MIXED) if not p.greedy]
    truncated = truncate_batch(processed[drawn], [MIXED[i] for i in drawn])
    for row, i in zip(truncated, drawn):
        reference = truncate(processed[i], MIXED[i])
        assert kept(row) == kept(reference)
        torch.testing.assert_close(row[row > -math.inf], reference[reference > -math.inf])


def test_batched_greedy_rows_and_logprobs_equal_the_reference_and_draws_survive_truncation():
    rows = torch.stack([logits(seed) for seed in range(len(MIXED))])
    params = [SamplingParams(**{**vars(p), "logprobs": 2}) for p in MIXED]
    tokens, infos = sample_batch(rows, params, [new_generator(i) for i in range(len(MIXED))], PROMPTS, OUTPUTS)
    for i, p in enumerate(params):
        processed = process_logits(rows[i], p, PROMPTS[i], OUTPUTS[i])
        if p.greedy:
            assert tokens[i] == sample(rows[i], p, new_generator(0), PROMPTS[i], OUTPUTS[i])[0]
        else:
            assert tokens[i] in kept(truncate(processed, p))
        reference = token_logprobs(rows[i].log_softmax(-1), tokens[i], 2)
        assert infos[i].logprob == reference.logprob and infos[i].top == reference.top


def test_a_rows_draws_depend_on_its_seed_only_not_on_the_rest_of_the_batch():
    params = SamplingParams(temperature=1.5, seed=11)

    def draws(seed, others):
        generators = [new_generator(seed)] + [new_generator(100 + j) for j in range(others)]
        out = []
        for step in range(20):
            rows = torch.stack([logits(step)] + [logits(50 + j) for j in range(others)])
            out.append(sample_batch(rows, [params] * (1 + others), generators, [[]] * (1 + others),
                                    [[]] * (1 + others))[0][0])
        return out

    assert draws(11, 0) == draws(11, 3) == draws(11, 1)
    assert draws(11, 0) != draws(12, 0)


def test_batched_draws_follow_the_distribution():
    row = torch.tensor([0.0, math.log(3.0)] + [-1e9] * 3)
    generator = new_generator(0)
    counts = torch.zeros(5)
    for _ in range(2000):
        counts[sample_batch(row[None], [SamplingParams()], [generator], [[]], [[]])[0][0]] += 1
    assert counts[2:].sum() == 0
    assert 0.70 < counts[1] / 2000 < 0.80


@pytest.mark.parametrize("extreme", [dict(temperature=5e-324), dict(repetition_penalty=5e-324),
                                     dict(temperature=1e-40, top_p=0.5, min_p=0.1), dict(top_p=5e-324)])
def test_batched_extreme_values_still_draw_a_best_token(extreme):
    row, seen = logits(4), list(range(0, VOCAB, 2))
    params = SamplingParams(**extreme)
    reference = truncate(process_logits(row, params, seen, []), params)
    best = {i for i, v in enumerate(reference.tolist()) if v == reference.max().item()}
    for seed in range(5):
        token = sample_batch(row[None], [SamplingParams(seed=seed, **extreme)], [new_generator(seed)], [seen],
                             [[]])[0][0]
        assert token in best


# ---- truncating rows drawn among their best CANDIDATES tokens (no sort of the vocabulary)

from tptt_runtime.engine import sampling  # noqa: E402

LARGE_VOCAB = 5000
TRUNCATING = [SamplingParams(top_p=0.9), SamplingParams(top_k=40, temperature=0.8), SamplingParams(min_p=0.05),
              SamplingParams(top_k=100, top_p=0.7, min_p=0.01, temperature=1.2), SamplingParams(top_p=0.95)]


def peaked(seed, vocab=LARGE_VOCAB):
    """Logits of a trained model's shape: a few dozen plausible tokens, a long tail far below."""
    torch.manual_seed(seed)
    row = torch.randn(vocab) * 2 - 8
    row[torch.randperm(vocab)[:30]] += 10
    return row


def test_the_candidates_mask_equals_the_reference_where_it_decides():
    """On a row's best CANDIDATES + 1 tokens: where the last is dropped, the kept tokens are exactly those
    `truncate` keeps on the whole vocabulary; flat rows (nearly uniform logits) are decided by top_k alone."""
    decided = []
    for seed, params in enumerate(TRUNCATING * 4):
        flat = seed >= len(TRUNCATING) * 3
        row = torch.randn(LARGE_VOCAB) * 0.01 if flat else peaked(seed)
        scaled = sampling._scale(row[None], [params])
        values, ids = scaled.topk(sampling.CANDIDATES + 1)
        masked = sampling._mask_sorted(values, [params], sampling._total(scaled, values[:, :1]))
        reference = kept(truncate(row, params))
        if masked[0, -1] == -math.inf:
            decided.append((flat, params.top_k))
            assert set(ids[0][masked[0] > -math.inf].tolist()) == reference
        else:
            assert len(reference) > sampling.CANDIDATES
    assert len([d for d in decided if not d[0]]) == len(TRUNCATING) * 3  # every peaked row
    assert all(top_k for flat, top_k in decided if flat)  # a flat row only by its top_k


def sorted_rows_drawn(monkeypatch):
    """Counts of rows that `sample_batch` sorts whole, per call."""
    calls, whole = [], sampling._sorted_truncation
    monkeypatch.setattr(sampling, "_sorted_truncation", lambda rows, params: calls.append(len(params)) or
                        whole(rows, params))
    return calls


def test_truncating_rows_draw_kept_tokens_and_only_flat_rows_sort_the_vocabulary(monkeypatch):
    calls = sorted_rows_drawn(monkeypatch)
    rows = torch.stack([peaked(seed) for seed in range(len(TRUNCATING))] + [torch.randn(LARGE_VOCAB) * 0.01])
    params = TRUNCATING + [SamplingParams(top_p=0.99)]
    for step in range(20):
        generators = [new_generator(100 * step + i) for i in range(len(params))]
        tokens, _ = sample_batch(rows, params, generators, [[]] * len(params), [[]] * len(params))
        for i, token in enumerate(tokens):
            assert token in kept(truncate(rows[i], params[i]))
    assert calls == [1] * 20  # the flat row alone, every step


@pytest.mark.parametrize("params", [SamplingParams(top_p=0.9), SamplingParams(top_k=3, min_p=0.01),
                                    SamplingParams()], ids=["candidates", "top_k", "whole vocabulary"])
def test_draws_follow_the_distribution(params):
    row = torch.full((1000,), -1e9)
    row[17], row[423] = 0.0, math.log(3.0)
    generator, counts = new_generator(0), {17: 0, 423: 0}
    for _ in range(2000):
        counts[sample_batch(row[None], [params], [generator], [[]], [[]])[0][0]] += 1
    assert 0.70 < counts[423] / 2000 < 0.80


def test_top_k_ties_past_the_candidates_sort_the_row_and_keep_the_references_tokens(monkeypatch):
    """300 tokens tied at the best value with top_k 40 and top_p 0.9: top_k keeps all 300, top_p 270 of them
    (which ones depends on how a sort orders ties), so the row is sorted whole and draws a tied token."""
    calls = sorted_rows_drawn(monkeypatch)
    row = torch.randn(LARGE_VOCAB) - 20
    tied = torch.randperm(LARGE_VOCAB)[:300]
    row[tied] = 5.0
    params = SamplingParams(top_k=40, top_p=0.9)
    assert len(kept(truncate(row, params))) == 270
    for seed in range(10):
        assert sample_batch(row[None], [params], [new_generator(seed)], [[]], [[]])[0][0] in set(tied.tolist())
    assert calls == [1] * 10


@pytest.mark.parametrize("temperature, top_p", [(1e-7, 0.9), (1e-6, 0.5), (1e-40, 0.5)])
def test_top_p_at_tiny_temperatures_keeps_the_references_tied_tokens(temperature, top_p):
    """Two (or, overflowing float32, four) tokens tied at the best value: their shares of the mass are
    softmax's, however large the scaled logits, so top_p keeps the reference's set of them."""
    row = torch.randn(LARGE_VOCAB).clamp(max=4.0)
    row[[3, 900]] = 6.0
    if temperature == 1e-40:
        row[[1200, 4000]] = 7.0  # overflows like 6.0 does
    params = SamplingParams(temperature=temperature, top_p=top_p)
    for rows in (row[None], torch.stack([row, peaked(1)])):
        masked = truncate_batch(rows, [params] * len(rows))[0]
        assert kept(masked) == kept(truncate(row, params))


def test_truncating_draws_depend_on_the_rows_seed_only():
    params = SamplingParams(top_p=0.8, temperature=1.3, seed=5)

    def draws(others):
        generators = [new_generator(5)] + [new_generator(100 + j) for j in range(others)]
        out = []
        for step in range(20):
            rows = torch.stack([peaked(step)] + [peaked(50 + j) for j in range(others)])
            companions = [SamplingParams(top_k=7)] * others
            out.append(sample_batch(rows, [params] + companions, generators, [[]] * (1 + others),
                                    [[]] * (1 + others))[0][0])
        return out

    assert draws(0) == draws(3) == draws(1)
