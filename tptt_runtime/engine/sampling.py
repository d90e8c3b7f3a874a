"""Per-request sampling: parameters (validated once) and the samplers that turn logits into tokens.

`sample_batch` serves: every row of a step at once, on the logits' device (bias, penalties, temperature and
truncation as [B, vocab] tensor operations; one transfer of B token ids to the host; raw logits leave the device
only for rows that asked for logprobs). `sample` does one row the obvious way and is the reference the batched
sampler is tested against.

Order of operations on a row of float32 logits, as in vLLM / Hugging Face:
    logit_bias -> repetition penalty (prompt + output) -> presence / frequency penalties (output)
    -> temperature -> top_k -> top_p -> min_p -> draw with the request's own generator (or argmax at temperature 0)
Reported logprobs are those of the model's raw distribution (log_softmax of the unprocessed logits), which is
what evaluation harnesses score. Each request owns a torch.Generator seeded from `seed`, so its samples do not
depend on which other requests share the batch: the batched draw inverts each row's cumulative distribution at
one uniform from the row's own generator (rows that truncate, among their CANDIDATES best tokens where those
hold every token the masks keep: `_draw_batch`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16                  # tokens to generate at most (0: score the prompt only)
    temperature: float = 1.0              # 0 = greedy
    top_p: float = 1.0                    # nucleus mass kept
    top_k: int = 0                        # keep the k best tokens; 0 or -1 = all
    min_p: float = 0.0                    # drop tokens whose probability < min_p * the best one's
    seed: int | None = None               # reproducible draws; None = fresh random seed
    stop: list[str] = field(default_factory=list)         # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens (besides EOS)
    ignore_eos: bool = False
    presence_penalty: float = 0.0         # OpenAI: subtract once for every token already generated
    frequency_penalty: float = 0.0        # OpenAI: subtract per occurrence in the output
    repetition_penalty: float = 1.0       # HF / vLLM: divide positive logits of seen tokens (prompt + output)
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None           # None: none; k >= 0: chosen token's logprob + k top alternatives
    prompt_logprobs: int | None = None    # same, for every prompt token (needs the whole prompt computed)

    def __post_init__(self):
        checks = [
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
            (0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 0, "top_k must be -1, 0 (off) or a positive integer"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
            (all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs must be in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (len(self.stop) <= 16, "at most 16 stop strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is None:
            self.seed = random.getrandbits(63)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids in logit_bias / stop_token_ids must exist."""
        for token in [*self.logit_bias, *self.stop_token_ids]:
            if not 0 <= token < vocab_size:
                raise ValueError(f"token id {token} is out of the vocabulary [0, {vocab_size})")


@dataclass
class TokenLogprobs:
    """Logprob of one token and the best alternatives at its position (token id -> logprob)."""
    token_id: int
    logprob: float
    top: dict[int, float]


def token_logprobs(logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprobs:
    """logprobs: [vocab] log_softmax of raw logits. `top` holds the k best tokens plus the chosen one (as
    vLLM does), with bit-identical values, so "was the chosen token the best" is an exact comparison."""
    top = {}
    if k > 0:
        values, ids = logprobs.topk(k)
        top = dict(zip(ids.tolist(), values.tolist()))
        top.setdefault(token_id, float(logprobs[token_id]))
    return TokenLogprobs(token_id, float(logprobs[token_id]), top)


def new_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                   output_ids: list[int]) -> torch.Tensor:
    """Apply bias and penalties to one row (a new tensor); logits: [vocab] float32."""
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        if seen.numel():
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                       picked * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids), minlength=logits.numel()).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def truncate(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top_k / top_p / min_p masks (removed tokens get -inf); logits: [vocab].
    Valid but tiny temperatures or repetition penalties overflow float32: the overflowed tokens tie as the best
    (the largest finite value) rather than turning every probability into nan."""
    largest = torch.finfo(logits.dtype).max
    logits = (logits / params.temperature).nan_to_num(nan=0.0, posinf=largest, neginf=float("-inf"))
    if 0 < params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop = mass_before >= params.top_p          # the token that crosses top_p is kept, and the best one
        drop[0] = False                             # always (top_p below float32's smallest value reads as 0)
        logits = logits.scatter(0, order[drop], float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           prompt_ids: list[int], output_ids: list[int]) -> tuple[int, TokenLogprobs | None]:
    """One token from one row of raw logits [vocab], and its logprobs when the request asked for them."""
    processed = process_logits(logits, params, prompt_ids, output_ids)
    if params.greedy:
        token = int(processed.argmax())
    else:
        probs = truncate(processed, params).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    info = None
    if params.logprobs is not None:
        info = token_logprobs(logits.log_softmax(-1), token, params.logprobs)
    return token, info


CANDIDATES = 256  # best tokens a truncating row is first drawn from (`_draw_batch`)


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                 prompt_ids: list[list[int]], output_ids: list[list[int]]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """One token per row of raw logits [B, vocab] (any device), in the same order of operations as `sample`."""
    processed = _process_batch(logits, params, prompt_ids, output_ids)
    tokens = processed.argmax(-1)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        rows = torch.tensor(drawn, device=logits.device)
        tokens[rows] = _draw_batch(processed[rows], [params[i] for i in drawn], [generators[i] for i in drawn])
    tokens = tokens.tolist()
    infos = [None if p.logprobs is None else token_logprobs(logits[i].float().cpu().log_softmax(-1), tokens[i],
                                                            p.logprobs) for i, p in enumerate(params)]
    return tokens, infos


def _draw_batch(processed: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]):
    """Tokens [n] drawn from processed logits [n, vocab] (temperature > 0): each row truncated as `truncate`
    does, then drawn by inverting its cumulative distribution (float64) at one uniform from its own generator.

    A row that truncates (top_k / top_p / min_p) keeps a prefix of its tokens sorted best first. It is first
    masked on its CANDIDATES + 1 best: where the last of them is dropped (and is not tied with a top_k cut's
    k-th value), so is every token below it, and the row is drawn among its candidates without sorting the
    vocabulary; other truncating rows are sorted whole. A row that does not truncate is drawn in vocabulary
    order."""
    device, vocab = processed.device, processed.shape[-1]
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(device)
    tokens = torch.empty(len(params), dtype=torch.long, device=device)
    truncating = [i for i, p in enumerate(params) if p.top_k or p.top_p < 1.0 or p.min_p > 0.0]
    plain = [i for i in range(len(params)) if i not in set(truncating)]
    if plain:
        rows = torch.tensor(plain, device=device)
        probs = _scale(processed[rows], [params[i] for i in plain]).softmax(-1)
        tokens[rows] = _invert_cdf(probs, uniforms[rows])
    narrow = [i for i in truncating if vocab > CANDIDATES + 1 and not params[i].top_k > CANDIDATES]
    undecided = [i for i in truncating if i not in set(narrow)]
    if narrow:
        rows, row_params = torch.tensor(narrow, device=device), [params[i] for i in narrow]
        scaled = _scale(processed[rows], row_params)
        values, ids = scaled.topk(CANDIDATES + 1)
        masked = _mask_sorted(values, row_params, _total(scaled, values[:, :1]))
        decided = (masked[:, -1] == float("-inf")) & ~_ties_past_candidates(values, row_params)
        picks = decided.nonzero()[:, 0]
        if picks.numel():
            picked = _invert_cdf(masked[picks, :-1].softmax(-1), uniforms[rows[picks]], _last_kept(masked[picks]))
            tokens[rows[picks]] = ids[picks].gather(-1, picked[:, None])[:, 0]
        undecided += [i for i, ok in zip(narrow, decided.tolist()) if not ok]
    if undecided:
        rows = torch.tensor(undecided, device=device)
        masked, order = _sorted_truncation(processed[rows], [params[i] for i in undecided])
        picked = _invert_cdf(masked.softmax(-1), uniforms[rows], _last_kept(masked))
        tokens[rows] = order.gather(-1, picked[:, None])[:, 0]
    return tokens


def _invert_cdf(probs: torch.Tensor, uniforms: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """Column index per row of probs [n, m]: the first whose cumulative mass (float64) exceeds u * the row's
    total, at most `last` [n] (the last kept column of a row whose kept tokens are a prefix: rounding in a
    device's parallel cumsum cannot then reach a dropped one)."""
    cumulative = probs.double().cumsum(-1)
    targets = uniforms[:, None] * cumulative[:, -1:]
    picked = torch.searchsorted(cumulative, targets, right=True)[:, 0]
    return picked.clamp_(max=probs.shape[-1] - 1) if last is None else torch.minimum(picked, last)


def _last_kept(masked: torch.Tensor) -> torch.Tensor:
    """Index of the last kept (finite) value of rows sorted best first whose kept values are a prefix."""
    return ((masked > float("-inf")).sum(-1) - 1).clamp_(min=0)


def _process_batch(logits, params, prompt_ids, output_ids) -> torch.Tensor:
    """`process_logits` for every row at once (a new tensor)."""
    logits = logits.float().clone()
    device = logits.device

    def pairs(rows_and_ids):  # (row index tensor, id tensor) of [(row, [ids])]
        rows = [r for r, ids in rows_and_ids for _ in ids]
        ids = [t for _, ids in rows_and_ids for t in ids]
        return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(ids, dtype=torch.long, device=device)

    biased = [(i, list(p.logit_bias)) for i, p in enumerate(params) if p.logit_bias]
    if biased:
        values = [v for i, _ in biased for v in params[i].logit_bias.values()]
        logits.index_put_(pairs(biased), torch.tensor(values, device=device), accumulate=True)
    repeated = [(i, sorted(set(prompt_ids[i]) | set(output_ids[i]))) for i, p in enumerate(params)
                if p.repetition_penalty != 1.0]
    if repeated:
        seen = torch.zeros_like(logits, dtype=torch.bool).index_put_(pairs(repeated), torch.tensor(True, device=device))
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    penalized = [(i, output_ids[i]) for i, p in enumerate(params)
                 if output_ids[i] and (p.presence_penalty or p.frequency_penalty)]
    if penalized:
        counts = torch.zeros_like(logits).index_put_(pairs(penalized), torch.tensor(1.0, device=device),
                                                     accumulate=True)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    return logits


def _scale(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, with float32 overflows as in `truncate`."""
    largest = torch.finfo(logits.dtype).max
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    return (logits / temperature).nan_to_num(nan=0.0, posinf=largest, neginf=float("-inf"))


def _total(scaled: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Sum of exp(x - best) over each whole row [n, 1]: softmax's denominator, relative to the row's best."""
    return (scaled - best).exp().sum(-1, keepdim=True)


def _cuts(params: list[SamplingParams], width: int) -> list[bool]:
    return [0 < p.top_k < width for p in params]


def _ties_past_candidates(values: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Rows [n] of sorted best values whose top_k cut keeps tokens past them: the last value ties the k-th."""
    cut = _cuts(params, values.shape[-1])
    if not any(cut):
        return torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    kth = torch.tensor([p.top_k if c else 1 for p, c in zip(params, cut)], device=values.device)[:, None]
    return torch.tensor(cut, device=values.device) & (values[:, -1] >= values.gather(-1, kth - 1)[:, 0])


def _mask_sorted(ordered: torch.Tensor, params: list[SamplingParams], total: torch.Tensor) -> torch.Tensor:
    """top_k, then top_p, then min_p on rows sorted best first (-inf where a token is dropped): whole rows, or
    their best values with `total` the whole row's `_total`. A row whose top_k cuts must have here every value
    at least its k-th. Probabilities are softmax's (relative to the best value, so that huge scaled logits
    keep their ties' shares)."""
    device, width = ordered.device, ordered.shape[-1]
    best = ordered[:, :1]
    # which masks to build is known from the params on the host (asking the device tensors would sync)
    cut = _cuts(params, width)
    if any(cut):
        kth = torch.tensor([p.top_k if c else width for p, c in zip(params, cut)], device=device)[:, None]
        ordered = ordered.masked_fill(ordered < ordered.gather(-1, kth - 1), float("-inf"))
        total = torch.where(torch.tensor(cut, device=device)[:, None], _total(ordered, best), total)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
        probs = (ordered - best).exp() / total
        drop = (probs.cumsum(-1) - probs >= top_p) & (top_p < 1.0)  # the token crossing top_p is kept,
        drop[:, 0] = False                                          # and the best one always
        ordered = ordered.masked_fill(drop, float("-inf"))
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
        ordered = ordered.masked_fill((ordered - best).exp() < min_p, float("-inf"))
    return ordered


def _sorted_truncation(logits: torch.Tensor, params: list[SamplingParams]):
    """`truncate` for every row at once on the whole vocabulary, in sorted order: (masked [n, vocab] best
    first, order: the token id of each column)."""
    scaled = _scale(logits, params)
    ordered, order = scaled.sort(dim=-1, descending=True)
    return _mask_sorted(ordered, params, _total(scaled, ordered[:, :1])), order
