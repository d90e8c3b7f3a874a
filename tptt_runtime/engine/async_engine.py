"""AsyncEngine: runs the LLMEngine's step loop on one thread and streams outputs to asyncio callers.

    async for output in engine.submit(request): ...

The model loop is the only thread that touches the model and the scheduler. Callers hand requests and aborts
over under a condition variable; outputs travel back through each request's asyncio.Queue on the caller's event
loop (call_soon_threadsafe), where each request's OutputProcessor adds the text and applies its stop strings
(the engine thread only samples tokens); a stop string stops the request in the engine at its next step.
Leaving the `async for` early (a client disconnect cancels it) aborts the request, and the engine frees its slot
at the next step. A full waiting queue raises EngineOverloaded at submission.

Threads: every application thread that runs a parallel torch CPU op gets its own OpenMP team, and two teams
on a small host oversubscribe it (every parallel op then waits for a sleeping worker: prefill and decode ran
2x slower on this thread while the main thread held a team, on 2 cores). With `threads`, the loop sets torch's
intra-op threads on its own thread; the caller keeps its own thread single-threaded (server/cli.py).

`compile_in_background()` builds a compiled twin of the model on another thread (TitansModel.compiled_copy)
while this loop goes on serving eagerly; the loop swaps it in between two steps once it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

import torch

from .detokenizer import OutputProcessor
from .engine import EngineOverloaded, LLMEngine
from .request import FinishReason, Request, RequestOutput

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, observers=(), threads: int = 0):
        """`observers`: callables run on the engine thread with every output (metrics). `threads`: torch
        intra-op threads of the engine thread (0: torch's setting as it stands)."""
        self.engine = engine
        self.threads = threads
        self.observers = list(observers)
        self.condition = threading.Condition()
        self.inbox: list[Request] = []
        self.aborts: list[tuple[str, str]] = []  # (request id, finish reason)
        self.listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="tptt-engine", daemon=True)
        self.decode_mode = "compiled" if engine.model.is_compiled else "eager"
        self._compiled = None  # the compiled twin, from compile_in_background, until the loop swaps it in
        self.stats = engine.load()  # refreshed every step; `full_stats()` adds the store's counts

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.engine.store.flush()

    def compile_in_background(self, cache_dir: str | None = None) -> threading.Thread:
        """Load or build the compiled decode step (TitansModel.compile, graphs kept in `cache_dir`) on a copy of
        the model on a daemon thread; the engine loop switches to it when it is ready (`decode_mode` becomes
        "compiled"). Serving stays eager meanwhile; a failure to compile is logged and serving stays eager."""
        model = self.engine.model

        def build():
            self.decode_mode = "compiling"
            try:
                twin = model.compiled_copy(cache_dir)
            except Exception:  # noqa: BLE001 - a compiler problem must not take serving down
                log.exception("compiling the decode step failed; serving stays eager")
                self.decode_mode = "eager"
                return
            with self.condition:
                self._compiled = twin
                self.condition.notify()

        thread = threading.Thread(target=build, name="tptt-compile", daemon=True)
        thread.start()
        return thread

    def full_stats(self) -> dict[str, int]:
        """The latest step's load plus the store's counts now (for /metrics)."""
        return self.engine.stats(self.stats)

    @property
    def num_waiting(self) -> int:
        return self.stats["num_waiting"] + len(self.inbox)

    def submit(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Queue `request` and return the stream of its outputs (ending with the one that has finish_reason).
        Raises ValueError (a request the model cannot serve) or EngineOverloaded right here, before any output.
        Closing the stream early aborts the request; a stream never iterated must be aborted by the caller."""
        queue: asyncio.Queue = asyncio.Queue()
        self.engine.validate(request)
        processor = OutputProcessor(self.engine.tokenizer, request)
        with self.condition:
            if self.num_waiting >= self.engine.config.max_waiting:
                raise EngineOverloaded(f"{self.num_waiting} requests are waiting")
            self.listeners[request.request_id] = (asyncio.get_running_loop(), queue)
            self.inbox.append(request)
            self.condition.notify()
        return self._stream(request.request_id, queue, processor)

    async def _stream(self, request_id: str, queue: asyncio.Queue,
                      processor: OutputProcessor) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                output, stop_engine = processor.process(await queue.get())
                if stop_engine:
                    self.abort(request_id, FinishReason.STOP)
                if output is None:
                    continue
                finished = output.finish_reason is not None
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str, reason: str = FinishReason.ABORT) -> None:
        with self.condition:
            self.aborts.append((request_id, reason))
            self.condition.notify()

    # ----------------------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self.condition:
                while not (self.stopping or self.inbox or self.aborts or self.engine.has_work() or self._compiled):
                    self.condition.wait()
                if self.stopping:
                    return
                if self._compiled is not None:
                    self.engine.use_model(self._compiled)
                    self._compiled, self.decode_mode = None, "compiled"
                    log.info("decode steps now run compiled")
                # admitted under the lock, with the count refreshed, so that `submit` never sees a request in
                # neither the inbox nor the count (it would accept more than the engine will queue)
                for request in self.inbox:
                    self._add(request)
                self.inbox = []
                self.stats = {**self.stats, "num_waiting": len(self.engine.scheduler.waiting)}
                aborts, self.aborts = self.aborts, []
            for request_id, reason in aborts:
                self.engine.abort(request_id, reason)
            try:
                outputs = self.engine.step()
            except Exception:  # noqa: BLE001 - the loop must survive; the step's requests were already failed
                log.exception("engine step failed")
                outputs = []
            self.stats = self.engine.load()
            for output in outputs:
                self._deliver(output)

    def _add(self, request: Request) -> None:
        try:
            self.engine.add_request(request)
        except (ValueError, EngineOverloaded) as error:
            log.warning("request %s refused: %s", request.request_id, error)
            self._deliver(RequestOutput(request.request_id, [], "", [], finish_reason="error", error=str(error)))

    def _deliver(self, output: RequestOutput) -> None:
        for observe in self.observers:
            observe(output)
        with self.condition:
            listener = self.listeners.get(output.request_id)
            if listener is not None and output.finish_reason is not None:
                del self.listeners[output.request_id]
        if listener is None:
            return
        loop, queue = listener
        loop.call_soon_threadsafe(queue.put_nowait, output)
