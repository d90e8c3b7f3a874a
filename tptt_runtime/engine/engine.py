"""LLMEngine: the synchronous heart of serving. One `step()` = schedule, run the model, postprocess.

The engine owns the model, the scheduler and the session store; it knows token ids only, never text nor HTTP
(output text and stop strings are made on the caller's side: detokenizer.OutputProcessor). `AsyncEngine`
(async_engine.py) runs it on its own thread.

Per step:
    schedule     admit waiting requests (resuming the longest stored snapshot of their prompt), pick decodes and
                 prefill chunks under the token budget
    run          the step's prefill chunks packed into one forward (or more, 2048 tokens each: several
                 requests' new prompts prefill together, each from its own position), the decoding requests'
                 rows carried by the same forward (`mixed_steps`); a step without prompts decodes in one
                 batched forward (compiled, or replayed as a CUDA graph, where the model has one). Decode rows
                 are the front rows of the state pool (engine/state_pool.py: every running request's tensors
                 live in one slot of it, written in place)
    postprocess  sample every request that has fresh logits in one batched draw on the device, apply the
                 token stop conditions (EOS, stop token ids, max_tokens), emit outputs;
                 store a snapshot after every prompt and at every finish (prefix reuse for the next turn)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..cuda_graphs import GraphedDecode, RecordingFailed
from ..model import DecodeRows, PrefillPiece, TitansModel
from .request import FinishReason, Request, RequestOutput
from .sampling import sample_batch, token_logprobs
from .scheduler import ScheduledBatch, Scheduler
from .state_pool import StatePool
from .redis_tier import RedisTier
from .store import SessionStore

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_num_seqs: int = 32                 # requests running at once (decoded together)
    max_num_batched_tokens: int = 1024     # tokens per step: decode rows + prefill chunks
    max_waiting: int = 256                 # queued requests beyond which new ones are refused (HTTP 429)
    max_prompt_tokens: int = 65536         # longest accepted prompt (the state is constant; compute is not)
    prefix_reuse: bool = True              # resume prompts from stored snapshots
    store_bytes: int = 1 << 30             # resident snapshot bytes (LRU beyond)
    store_dir: str | None = None           # spill + persistence directory for snapshots and sessions
    store_disk_bytes: int | None = None    # cap on unpinned snapshot files
    redis_url: str | None = None           # shared tier behind RAM and disk (several processes, one set of sessions)
    cuda_graphs: bool = True               # a CUDA model's decode steps replayed as CUDA graphs (cuda_graphs.py)
    mixed_steps: bool = True               # a step's decode rows ride in its prefill forward (else a forward apart)

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.store_bytes < 0:
            raise ValueError("store_bytes must be >= 0")


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: retry later."""


class LLMEngine:
    def __init__(self, model: TitansModel, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self.tokenizer = model.tokenizer
        self.eos_ids = eos_token_ids(model)
        remote = RedisTier(self.config.redis_url, model.fingerprint) if self.config.redis_url else None
        self.store = SessionStore(model.fingerprint, self.config.store_bytes, self.config.store_dir,
                                  self.config.store_disk_bytes, remote)
        self.scheduler = Scheduler(self.config.max_num_seqs, self.config.max_num_batched_tokens, self._admit,
                                   wait_for_duplicates=self.config.prefix_reuse)
        self.pool = StatePool(model, self.config.max_num_seqs)
        self.graphs = self._graphs(model)
        self.requests: dict[str, Request] = {}
        self.kv_bytes_per_token = model.kv_cache_bytes_per_token  # the baseline's bytes per context token

    # ------------------------------------------------------------------------------------------ API
    def validate(self, request: Request) -> None:
        """Raise ValueError for a request the model cannot serve (the HTTP layer turns it into a 400)."""
        ids = request.prompt_ids
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > self.config.max_prompt_tokens:
            raise ValueError(f"the prompt has {len(ids)} tokens; this server accepts at most "
                             f"{self.config.max_prompt_tokens} (--max-prompt-tokens)")
        if min(ids) < 0 or max(ids) >= self.model.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.model.vocab_size})")
        request.params.check_vocab(self.model.vocab_size)
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id} is already in use")

    def add_request(self, request: Request) -> None:
        self.validate(request)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineOverloaded(f"{len(self.scheduler.waiting)} requests are waiting")
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str, reason: str = FinishReason.ABORT) -> None:
        """Mark for removal; the next step frees its slot and emits its final output with `reason`. A caller
        whose stop string ended the text passes FinishReason.STOP: the state it ends with is then stored as
        a snapshot of the ids it consumed, as at any stop."""
        request = self.requests.get(request_id)
        if request is not None and request.abort_reason is None:
            request.abort_reason = reason

    def use_model(self, model: TitansModel) -> None:
        """Serve from `model` from the next step on: the same weights (fingerprint), e.g. its compiled twin;
        running requests keep their slots and go on."""
        if model.fingerprint != self.model.fingerprint:
            raise ValueError("the new model has other weights or another config than the one serving")
        self.model = self.pool.model = model
        self.graphs = self._graphs(model)

    def _graphs(self, model: TitansModel) -> GraphedDecode | None:
        """CUDA graphs of `model`'s decode step over the pool's rows, where the model is on a CUDA device."""
        if self.config.cuda_graphs and model.device.type == "cuda":
            return GraphedDecode(model, self.pool.layers)
        return None

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        outputs = self._drop_aborted()
        batch = self.scheduler.schedule()
        failed = self._run(batch)
        return outputs + failed + self._postprocess()

    def load(self) -> dict[str, int]:
        """What the running set holds; cheap (the async engine refreshes it every step)."""
        running = self.scheduler.running
        return {
            "num_running": len(running),
            "num_waiting": len(self.scheduler.waiting),
            "running_state_bytes": self.pool.slot_nbytes * sum(r.slot is not None for r in running),
            "running_tokens": sum(r.num_computed + max(0, len(r.output_ids) - 1) for r in running),
        }

    def stats(self, load: dict[str, int] | None = None) -> dict[str, int]:
        """`load` (default: now) plus the store's counts; walks the store, so it is read at scrape time."""
        load = load or self.load()
        store = self.store.stats()
        return {
            **load,
            "session_state_bytes": load["running_state_bytes"] + store["resident_bytes"],
            "kv_cache_equivalent_bytes": (load["running_tokens"] + store["resident_tokens"]) * self.kv_bytes_per_token,
            **store,
        }

    # -------------------------------------------------------------------------------------- schedule
    def _admit(self, request: Request) -> None:
        """Give a request its slot, holding the longest stored snapshot that prefixes its prompt (copied from
        the store straight into the slot) or a new session."""
        request.scheduled_time = time.monotonic()
        hit = None
        if self.config.prefix_reuse and not request.wants_prompt_logprobs:
            hit = self.store.longest_prefix(request.namespace, request.prompt_ids, copy=self.pool.acquire)
            if hit is not None and hit[2] == len(request.prompt_ids) and hit[1] is None:
                self.pool.release(hit[0])  # the whole prompt, but no logits to sample from: one token shorter
                hit = self.store.longest_prefix(request.namespace, request.prompt_ids, len(request.prompt_ids) - 1,
                                                copy=self.pool.acquire)
        if hit is None:
            request.slot = self.pool.acquire()
            return
        request.slot, logits, request.num_cached = hit
        request.num_computed = request.num_cached
        if request.num_cached == len(request.prompt_ids):
            request.pending_logits = logits

    def _drop_aborted(self) -> list[RequestOutput]:
        outputs = []
        for request in [r for r in self.requests.values() if r.abort_reason and r.finish_reason is None]:
            request.finish_reason = request.abort_reason
            outputs.append(self._finish(request))
        return outputs

    # ------------------------------------------------------------------------------------------- run
    def _run(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """Model forwards of one step; a request whose forward fails is finished with an error output."""
        if batch.decodes:
            try:
                self._move_to_front(batch.decodes)  # before the prefill pieces take views of their slots
            except Exception as error:  # noqa: BLE001 - slots may be half swapped: every request of the step fails
                log.exception("moving the decoding requests' slots failed")
                return [self._fail(r, error) for r in batch.decodes + [r for r, _ in batch.prefills]]
        mixed = batch.decodes if batch.prefills and self.config.mixed_steps else []
        failed = self._prefill(batch.prefills, mixed) if batch.prefills else []
        if batch.decodes and not mixed:
            try:
                self._decode(batch.decodes)
            except Exception as error:  # noqa: BLE001
                log.exception("decode step failed")
                failed += [self._fail(r, error) for r in batch.decodes]
        return failed

    def _prefill(self, prefills: list[tuple[Request, int]], decodes: list[Request]) -> list[RequestOutput]:
        """The step's prompt chunks packed into one forward (TitansModel.prefill_packed) that writes each request's
        slot in place, with the `decodes`' rows (pool rows 0 .. B-1) as one more piece; requests at the same
        position taking as many tokens from consecutive slots go as one batched piece (`prefill_runs`). Returns
        the error outputs: every request's if the forward fails (their slots are partly written), else those
        whose bookkeeping failed."""
        runs = prefill_runs(prefills)
        pieces = [self._piece(run) for run in runs]
        try:
            logits = self.model.prefill_packed(pieces + ([self._decode_piece(decodes)] if decodes else []))
        except Exception as error:  # noqa: BLE001 - reported to those requests' clients, the engine goes on
            in_forward = [request for request, _ in prefills] + decodes
            log.exception("the step's forward failed for %s", ", ".join(r.request_id for r in in_forward))
            return [self._fail(request, error) for request in in_forward]
        if decodes:
            for request, row in zip(decodes, logits.pop()[:, -1]):  # the decode piece's [B, 1, vocab]
                request.pending_logits = row
        failed = []
        for run, piece, rows in zip(runs, pieces, logits):
            for (request, num_tokens), request_logits in zip(run, rows):
                try:
                    self._prefilled(request, num_tokens, piece, request_logits)
                except Exception as error:  # noqa: BLE001
                    log.exception("after the prefill of %s", request.request_id)
                    failed.append(self._fail(request, error))
        return failed

    def _piece(self, run: list[tuple[Request, int]]) -> PrefillPiece:
        """The prefill piece of requests in consecutive slots at one position, taking as many tokens."""
        first, (start, num_tokens) = run[0][0].slot, (run[0][0].num_computed, run[0][1])
        ids = torch.tensor([r.prompt_ids[start:start + num_tokens] for r, _ in run], device=self.model.device)
        return PrefillPiece(self.pool.rows(first, len(run)), start, ids, run[0][0].wants_prompt_logprobs)

    def _prefilled(self, request: Request, num_tokens: int, piece: PrefillPiece, logits: torch.Tensor) -> None:
        """A request's bookkeeping after its prompt chunk: prompt logprobs, and at the prompt's end the logits to
        sample from and a snapshot of the prompt."""
        if piece.all_logits:
            self._record_prompt_logprobs(request, piece.start, logits.cpu())
        request.num_computed += num_tokens
        if not request.is_prefill:
            request.pending_logits = logits[-1]
            self._snapshot(request, request.prompt_ids, logits[-1])

    def _decode_piece(self, requests: list[Request]) -> DecodeRows:
        """The decoding requests (in pool rows 0 .. B-1) as the decode rows of a packed prefill."""
        return self.model.decode_piece(self.pool.rows(0, len(requests)), *self._decode_inputs(requests))

    def _decode_inputs(self, requests: list[Request]) -> tuple[torch.Tensor, list[int]]:
        """Each decoding request's last sampled token (ids [B] on the model's device) and the tokens it has seen."""
        return (torch.tensor([r.output_ids[-1] for r in requests], device=self.model.device),
                [r.num_tokens - 1 for r in requests])

    def _decode(self, requests: list[Request]) -> None:
        """One token for every decoding request, over pool rows 0 .. B-1 (moved there by `_run`)."""
        logits = self._decode_logits(*self._decode_inputs(requests))
        for request, row in zip(requests, logits):  # sampled on the device (`_postprocess`)
            request.pending_logits = row

    def _decode_logits(self, ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Logits of one step of pool rows 0 .. B-1: replayed as a CUDA graph where there are graphs and no row
        fills the sinks, else op by op (also from the step on which a graph fails to record)."""
        if self.graphs is not None and min(positions) >= self.model.config.sinks:
            try:
                return self.graphs(ids, positions)
            except RecordingFailed:
                log.warning("decoding without CUDA graphs from now on", exc_info=True)
                self.graphs = None
            except torch.OutOfMemoryError:
                log.warning("no memory to record a CUDA graph of %d rows: this step runs op by op", len(positions))
        return self.model.decode_rows(self.pool.rows(0, len(positions)), ids, positions)

    def _move_to_front(self, requests: list[Request]) -> None:
        """Swap slots so that requests[i] holds slot i (a no-op while the decoding set stays the same)."""
        owners = {r.slot: r for r in self.scheduler.running if r.slot is not None}
        for row, request in enumerate(requests):
            old = request.slot
            if old == row:
                continue
            self.pool.swap(row, old)
            other = owners.pop(row, None)
            if other is not None:
                other.slot, owners[old] = old, other
            else:
                owners.pop(old, None)
            request.slot, owners[row] = row, request

    def _record_prompt_logprobs(self, request: Request, start: int, logits: torch.Tensor) -> None:
        """Logprob of prompt token t+1 under the logits after token t; the first prompt token has none."""
        if start == 0:
            request.prompt_logprobs.append(None)
        logprobs = logits.log_softmax(-1)
        targets = request.prompt_ids[start + 1:start + 1 + logits.shape[0]]
        k = request.params.prompt_logprobs
        request.prompt_logprobs += [token_logprobs(logprobs[i], t, k) for i, t in enumerate(targets)]

    # ----------------------------------------------------------------------------------- postprocess
    def _postprocess(self) -> list[RequestOutput]:
        """Every running request with fresh logits (from this step's forwards or a resumed snapshot) advances:
        one batched draw for all of them (`sample_batch`, on the logits' device)."""
        ready = [r for r in self.scheduler.running if r.pending_logits is not None]
        outputs = []
        for request in [r for r in ready if r.params.max_tokens == 0]:  # scoring the prompt only
            request.finish_reason = FinishReason.LENGTH
            outputs.append(self._finish(request))
        ready = [r for r in ready if r.params.max_tokens > 0]
        if not ready:
            return outputs
        try:
            drawn = self._draw(ready)
        except Exception:  # noqa: BLE001 - find the rows that fail alone: they fail, the others go on
            log.exception("sampling failed for a batch of %d", len(ready))
            drawn = []
            for request in ready:
                try:
                    drawn += self._draw([request])
                except Exception as error:  # noqa: BLE001
                    outputs.append(self._fail(request, error))
        for request, token, info in drawn:
            try:
                outputs.append(self._advance(request, token, info))
            except Exception as error:  # noqa: BLE001 - that request fails; the others and the engine go on
                log.exception("advancing %s failed", request.request_id)
                outputs.append(self._fail(request, error))
        return outputs

    def _draw(self, requests: list[Request]) -> list[tuple[Request, int, object]]:
        logits = torch.stack([r.pending_logits.to(self.model.device) for r in requests])
        tokens, infos = sample_batch(logits, [r.params for r in requests], [r.generator for r in requests],
                                     [r.prompt_ids for r in requests], [r.output_ids for r in requests])
        return list(zip(requests, tokens, infos))

    def _advance(self, request: Request, token: int, info) -> RequestOutput:
        """Append a sampled token to a request and apply the token stop conditions."""
        params, logits = request.params, request.pending_logits
        request.pending_logits = None
        request.output_ids.append(token)
        request.first_token_time = request.first_token_time or time.monotonic()
        request.last_logits = logits
        if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            request.finish_reason = FinishReason.STOP
        elif len(request.output_ids) >= params.max_tokens:
            request.finish_reason = FinishReason.LENGTH
        if request.finish_reason is not None:
            return self._finish(request, [token], [info] if info else [])
        return self._output(request, [token], [info] if info else [])

    def _finish(self, request: Request, token_ids=(), logprobs=()) -> RequestOutput:
        """Free the request's slot; keep the state it ends with as a snapshot of the ids it consumed."""
        if request.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and request.output_ids:
            consumed = request.prompt_ids + request.output_ids[:-1]  # the last sampled token was never fed
            self._snapshot(request, consumed, request.last_logits)
        self.scheduler.finish(request)
        self.requests.pop(request.request_id, None)
        output = self._output(request, list(token_ids), list(logprobs))
        self._release(request)
        return output

    def _fail(self, request: Request, error: Exception) -> RequestOutput:
        request.finish_reason = FinishReason.ERROR
        self.scheduler.finish(request)
        self.requests.pop(request.request_id, None)
        output = self._output(request, [], [])
        output.error = f"{type(error).__name__}: {error}"
        self._release(request)
        return output

    def _release(self, request: Request) -> None:
        if request.slot is not None:
            self.pool.release(request.slot)
            request.slot = None

    def _snapshot(self, request: Request, ids: list[int], logits) -> None:
        """Store a copy of the request's slot as the state after `ids` (prefix reuse, named sessions)."""
        if not self.config.prefix_reuse or request.slot is None:
            return
        state = self.pool.snapshot(request.slot, len(ids))
        request.snapshot_keys.append(self.store.put(request.namespace, ids, state, logits.to("cpu", copy=True)))

    def _output(self, request: Request, token_ids: list[int], logprobs: list) -> RequestOutput:
        first = not request.output_ids[:-1] if token_ids else request.finish_reason is not None
        return RequestOutput(
            request_id=request.request_id, token_ids=token_ids, text="", logprobs=logprobs,
            finish_reason=request.finish_reason,
            prompt_logprobs=request.prompt_logprobs if request.wants_prompt_logprobs and first else None,
            num_prompt_tokens=len(request.prompt_ids), num_cached_tokens=request.num_cached,
            num_output_tokens=len(request.output_ids),
            state_bytes=self.pool.slot_nbytes if request.slot is not None else 0,
            arrival_time=request.arrival_time, scheduled_time=request.scheduled_time,
            first_token_time=request.first_token_time,
            snapshot_keys=list(request.snapshot_keys) if request.finish_reason else [],
        )


def prefill_runs(prefills: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
    """The step's prefill chunks as runs that one batched piece can carry: requests in consecutive slots at the
    same prompt position, taking the same number of tokens, alike in wanting prompt logprobs (all logits)."""
    def key(item):
        request, num_tokens = item
        return request.num_computed, num_tokens, request.wants_prompt_logprobs

    runs: list[list[tuple[Request, int]]] = []
    for item in sorted(prefills, key=lambda item: (key(item), item[0].slot)):
        last = runs[-1][-1] if runs else None
        if last is not None and key(last) == key(item) and last[0].slot + 1 == item[0].slot:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def eos_token_ids(model: TitansModel) -> set[int]:
    """EOS ids from the generation config and the tokenizer (chat models often have several)."""
    ids = set()
    generation = getattr(model.hf, "generation_config", None)
    for source in (getattr(generation, "eos_token_id", None), getattr(model.tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids
