"""The local engine: one scheduler thread owns a model and batches the forwards of every request.

Contract: ``Engine(model, tokenizer)`` serves ``Request`` objects (runtime/base.py) with
continuous batching. Each admitted request is a coroutine (a greenlet) on the scheduler's own
thread: its ``RequestMachine`` (the stages) driven by a ``LocalDriver`` (runtime/local_driver.py)
against a *view* of the model: every forward (a prefill, a plan token, a step of N branches, a
conclusion token) is parked with the scheduler until its logits are there; the scheduler resumes
every ready request until each has parked its next call (or ended), then runs ONE forward over
all of them, whatever stage each is at (runtime/ragged.py keeps each call to its own cache): a
request joins at the next step and leaves when it is done; long prefills are cut into chunks
interleaved with decode steps. No thread per request, no lock between requests' Python, no
waiting window: the scheduler knows when every request has handed in its call. Each request's
output is the one it gets alone (tested token for token): batching changes speed, not text.

Limits: ``max_concurrent_requests`` running at once, ``max_batch_rows`` tokens per forward and
an optional ``kv_budget_bytes`` reserved per request at admission; beyond them requests wait in
a FIFO queue. Cancellation and timeouts take a request's calls out at the next step and free its
KV; an out-of-memory (or any) error in a batched forward is retried in halves, so only the call
that fails alone sees the error, and the batch cap shrinks. At interpreter exit every request
is cancelled at once and the scheduler is joined; calls made from non-daemon threads that
outlive ``main`` are served until they end (the interpreter waits for those threads first).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import functools
import inspect
import itertools
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import greenlet
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..decoding.attention import attention_configs
from ..decoding.cache import kv_bytes
from ..decoding.lean import lean_forward
from ..decoding.masks import model_mask_kind
from ..decoding.sampling import use_row_sampler
from ..decoding.sequential import Cancelled
from ..pipeline.backend import LocalBackend
from ..pipeline.machine import RequestMachine
from .base import EngineLimits, Item, Request
from .calls import (
    Call,
    ModelView,
    Submission,
    cache_mark,
    cache_restore,
    drop_tracebacks,
    fresh_prefill,
    kv_bytes_per_token,
    kv_reservation,
    timeout_error,
    with_engine_report,
)
from .kv import KVPools, PoolLayer, SlabLayer
from .local_driver import LocalDriver
from .prefix_cache import PrefixCache, common_prefix
from .ragged import forward_step, pack_step
from .retry import is_transient, run_with_retries
from .row_sampling import RowSampler
from .stage_tags import STAGES, after_event, initial_stage
from .threads import CoreWatch, apply_threads

__all__ = ["Engine", "EngineLimits"]

_POLL_S = 0.05  # how often waiting threads look at cancel flags, deadlines and engine health
_MIN_TAIL = 8  # prompt tokens a prefix-cache hit leaves to compute (see _share_prefill)
_REGROW_STEPS = 32  # good steps after an out-of-memory before the row cap doubles again
_ENGINE_NUMBERS = itertools.count(1)


class _Core:
    """The engine's state, shared by its scheduler thread and workers (not by the caller's
    handle, so an engine nobody holds can be collected and its thread stopped)."""

    def __init__(self, model: Any, tokenizer: Any, name: str, limits: EngineLimits) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.limits = limits
        self.configs = attention_configs(model)  # walked once, not per forward
        self.lean = lean_forward(model)  # a stock Llama's forward as a loop (decoding/lean.py)
        self.base_impl = model.config._attn_implementation or "eager"
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        kind, _ = model_mask_kind(model)
        dummy = torch.zeros(1, 1, 1, 1, device=model.get_input_embeddings().weight.device)
        # A 4D mask makes transformers skip its own mask building; the segments bring theirs.
        self.dummy_mask = (
            {"full_attention": dummy, "sliding_attention": dummy} if kind == "dict" else dummy
        )
        self.kv_per_token = kv_bytes_per_token(model)
        dtype = next(model.parameters()).dtype
        # float32 answers equal their solo runs whatever the batch; half precision's do not.
        self.invariant = dtype == torch.float32
        # Half precision with sdpa: caches share one buffer per layer, so a step's short
        # segments attend in one call per run of slots (runtime/kv.py, ragged.attend_pooled).
        half = dtype in (torch.bfloat16, torch.float16)
        self.kv_pool = KVPools() if half and self.base_impl == "sdpa" else None
        self.prefix = PrefixCache(limits.prefix_cache_bytes)
        self.kv_reuse_problem = LocalBackend(model, tokenizer).kv_reuse_problem()
        # Fresh prefills running now: id -> (prompt ids, set once its KV is stored).
        self.prefilling: dict[int, tuple[list[int], threading.Event]] = {}
        self.cond = threading.Condition()
        # Requests' coroutines (greenlets, run on the scheduler thread only): ``ready`` ones are
        # resumed before the next forward; ``sleeping`` ones (a retry's backoff) at their time.
        self.ready: collections.deque[greenlet.greenlet] = collections.deque()
        self.sleeping: list[tuple[float, int, greenlet.greenlet]] = []
        self.hub: greenlet.greenlet | None = None  # the scheduler's own greenlet
        # Every request's sample_next of a step, in one pass (runtime/row_sampling.py).
        self.sampler = RowSampler(lambda: self.hub, self.ready.append)
        self.queue: collections.deque[Submission] = collections.deque()
        self.running: dict[int, Submission] = {}
        self.pending: list[Call] = []
        self.reserved = 0
        self.row_cap = limits.max_batch_rows
        self.good_steps = 0
        self.closed = False
        self.seq = itertools.count()
        self.counters = collections.Counter()
        self.cores = CoreWatch()
        # Thread names carry the engine's number, so stats() can count this engine's threads.
        self.tag = f"parallel-reason-{next(_ENGINE_NUMBERS)}-"
        self.thread = threading.Thread(target=self._loop, name=self.tag + "engine", daemon=True)
        self.thread.start()
        _THREADS.add(self.thread)

    # -- the caller's side ------------------------------------------------------------------

    def submit(self, request: Request, sink: Callable[[tuple[str, Any]], None]) -> Submission:
        req = Submission(request, sink, next(self.seq))
        req.reserved = kv_reservation(
            request, request.tokenizer or self.tokenizer, self.kv_per_token, self.limits
        )
        budget = self.limits.kv_budget_bytes
        if budget is not None and req.reserved > budget:
            msg = (
                f"this request may need {req.reserved} bytes of KV cache, more than "
                f"kv_budget_bytes={budget}; raise kv_budget_bytes or lower max_tokens"
            )
            raise ValueError(msg)
        with self.cond:
            if self.closed:
                raise RuntimeError("the engine is closed; create a new chat model")
            req.queued_ahead = len(self.queue)
            self.queue.append(req)
            self.counters["submitted"] += 1
            self.cond.notify_all()
        return req

    def cancel(self, req: Submission) -> None:
        req.cancel.set()
        with self.cond:
            self.cond.notify_all()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stats(self) -> dict[str, Any]:
        with self.cond:
            c = self.counters
            return {
                "running": len(self.running),
                "queued": len(self.queue),
                "steps": c["steps"],
                "rows": c["rows"],
                "mean_rows_per_step": round(c["rows"] / c["steps"], 2) if c["steps"] else 0.0,
                "max_rows_per_step": c["max_rows"],
                "row_cap": self.row_cap,
                "kv_reserved_bytes": self.reserved,
                "kv_budget_bytes": self.limits.kv_budget_bytes,
                "kv_bytes_live": sum(kv_bytes(r.cache_ref()) for r in self.running.values()),
                "submitted": c["submitted"],
                "completed": c["completed"],
                "failed": c["failed"],
                "cancelled": c["cancelled"],
                "split_retries": c["split_retries"],
                "sample_passes": self.sampler.passes,
                "sampled_rows": self.sampler.rows,
                # What the scheduler sees of each request: the stage its next forward is for.
                "running_by_stage": _by_stage(r.stage for r in self.running.values()),
                "parked_by_stage": _by_stage(call.stage for call in self.pending),
                "rows_by_stage": {s: c["rows_" + s] for s in STAGES},
                "threads": sum(t.name.startswith(self.tag) for t in threading.enumerate()),
                "forward": "lean" if self.lean is not None else "transformers",
                "max_concurrent_requests": self.limits.max_concurrent_requests,
                "max_batch_rows": self.limits.max_batch_rows,
                **self.prefix.stats(),
                **(self.kv_pool.stats() if self.kv_pool is not None else {}),
            }

    def close(self, join_s: float = 0.0) -> None:
        with self.cond:
            self.closed = True
            for req in list(self.queue) + list(self.running.values()):
                req.cancel.set()
            self.cond.notify_all()
        if join_s and threading.current_thread() is not self.thread:
            self.thread.join(join_s)

    # -- a worker's side --------------------------------------------------------------------

    def run_call(self, call: Call) -> torch.Tensor:
        """Hand ``call`` to the scheduler and wait for its logits ``[K, V]``."""
        req = call.req
        if req.expired(time.monotonic()):
            raise Cancelled("decoding cancelled")
        with contextlib.suppress(TypeError):  # caches are weak-referenceable; be lenient
            req.cache_ref = weakref.ref(call.cache)
        fresh = fresh_prefill(call) if self.prefix.max_bytes > 0 else None
        lead = self._share_prefill(call) if fresh is not None else None
        try:
            with self.cond:
                if self.closed:
                    raise Cancelled("the engine was closed")
                req.call = call
                self.pending.append(call)
            try:
                while not call.done.is_set():  # the scheduler resumes us when it is
                    self.hub.switch()
            finally:
                req.call = None  # the call holds the request's cache
            error, logits = call.error, call.logits
            call.error = call.logits = None
            if error is not None:
                raise error
            if fresh is not None:
                self._keep_prefix(call.ids, fresh)
            return logits
        finally:
            if lead is not None:
                with self.cond:
                    self.prefilling.pop(lead, None)[1].set()

    def _share_prefill(self, call: Call) -> int:
        """Serve a fresh prefill from the prefix cache; returns its key in ``prefilling``.

        Requests that arrive together (an ``abatch``, a burst at a server) share their system
        prompt, but none has stored it yet: a prefill that starts like one running now (by at
        least ``min_tokens`` more than is stored) waits for that one's KV instead of computing
        the same prefix again, then computes only the rest (at least its last ``_MIN_TAIL``
        tokens run: the last one's logits are the answer).
        """
        ids = call.ids.tolist()
        # At least _MIN_TAIL tokens still run: attention over a query block of 1-7 rows takes
        # other kernels on CPU than the same rows inside a longer prefill, which moves the
        # logits by float rounding (measured 1e-5 on tiny models; from 8 rows on: identical).
        limit = len(ids) - _MIN_TAIL
        if limit < self.prefix.min_tokens:
            return self._lead(call, ids)
        while True:
            stored = self.prefix.longest(ids, limit)
            with self.cond:
                running = [
                    (common_prefix(ids[:limit], other), done)
                    for other, done in self.prefilling.values()
                ]
            shared, done = max(running, key=lambda r: r[0], default=(0, None))
            if done is None or shared < stored + self.prefix.min_tokens:
                break
            while not done.is_set():  # other requests run meanwhile (that one's among them)
                if call.req.expired(time.monotonic()):
                    raise Cancelled("decoding cancelled")
                self.pause()
        hit, kv = self.prefix.match(ids, limit)
        if kv is not None:
            for layer, (keys, values) in enumerate(kv):
                call.cache.update(keys, values, layer)
            call.ran = hit
            call.req.prefix_hit_tokens += hit
        return self._lead(call, ids)

    def _lead(self, call: Call, ids: list[int]) -> int:
        """Register a fresh prefill as running (others that start alike may wait for it)."""
        key = id(call)
        with self.cond:
            self.prefilling[key] = (ids, threading.Event())
        return key

    def _keep_prefix(self, ids: torch.Tensor, cache: DynamicCache) -> None:
        """Store a finished prefill's prompt KV for later requests."""
        n = ids.shape[0]
        layers = cache.layers
        if not layers or any(
            type(layer) not in (DynamicLayer, SlabLayer, PoolLayer)
            or layer.keys is None
            or layer.keys.shape[-2] < n
            for layer in layers
        ):
            return  # a layer that drops or shares tokens: nothing exact to store
        self.prefix.insert(ids.tolist(), [(layer.keys, layer.values) for layer in layers])

    # -- a request's coroutine (runs on the scheduler thread) ---------------------------------

    def pause(self) -> None:
        """Let the other requests run until the scheduler's next round (from a request)."""
        self.ready.append(greenlet.getcurrent())
        self.hub.switch()

    def sleep(self, seconds: float) -> None:
        """Suspend the calling request for ``seconds`` (others run meanwhile)."""
        wake = time.monotonic() + max(0.0, seconds)
        self.sleeping.append((wake, next(self.seq), greenlet.getcurrent()))
        self.hub.switch()

    def _serve(self, req: Submission) -> None:
        from .. import pipeline as pl

        request = req.request
        try:
            if req.expired(time.monotonic()):
                raise pl.PipelineCancelled("cancelled while queued")
            tokenizer = request.tokenizer or self.tokenizer
            messages, tools, config = request.messages, request.tools, request.config
            if request.prepare is not None:
                messages, tools, config = request.prepare(tokenizer)
            req.stage = initial_stage(config)
            # This coroutine's sample_next calls wait for the step's one sampling pass (the
            # setting lives in this greenlet's own context: other requests set their own).
            use_row_sampler(self.sampler.park)
            result = self._answer(req, tokenizer, messages, tools, config)
        except pl.PipelineCancelled as e:
            error: BaseException = e
            if req.timed_out:
                error = timeout_error(request.timeout)
            # Nobody needs the frames of a cancelled pipeline; they hold its KV cache.
            drop_tracebacks(e)
            outcome, item = "cancelled", ("error", error)
        except BaseException as e:  # handed to the caller, who re-raises it
            outcome, item = "failed", ("error", e)
        else:
            outcome, item = "completed", ("done", result)
        self._end(req, outcome)
        req.send(item)

    def _answer(self, req: Submission, tokenizer, messages, tools, config) -> Any:
        from .. import pipeline as pl

        view = ModelView(self, req)
        sent_text = False

        def emit(event: Any) -> None:
            nonlocal sent_text
            req.stage = after_event(req.stage, event)
            req.send(("event", event))
            sent_text = sent_text or not isinstance(event, pl.StageEvent)

        def attempt() -> Any:
            # The request's machine runs the stages; its driver runs their forwards on the view.
            backend = LocalBackend(view, tokenizer)
            driver = LocalDriver(backend, tokenizer, req.cancel, self.kv_reuse_problem)
            machine = RequestMachine(
                driver.info, tokenizer, messages, config, tools=tools, cancel=req.cancel
            )
            with torch.no_grad():
                return with_engine_report(req, driver.run(machine, emit), self.invariant)

        def backoff(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end and not req.expired(time.monotonic()):
                self.sleep(min(_POLL_S, end - time.monotonic()))

        # A transient failure (e.g. out of memory) before the caller saw any text is retried
        # from scratch; after that the partial answer is already out.
        return run_with_retries(
            attempt,
            max_retries=req.request.max_retries,
            deadline=req.deadline,
            may_retry=lambda: not (sent_text or req.cancel.is_set()),
            sleep=backoff,
        )

    def _end(self, req: Submission, outcome: str) -> None:
        with self.cond:
            self.running.pop(req.seq, None)
            self.reserved -= req.reserved
            self.counters[outcome] += 1
            self.cond.notify_all()

    # -- the scheduler ----------------------------------------------------------------------

    def _loop(self) -> None:
        self.hub = greenlet.getcurrent()
        # One inference-mode scope around everything the requests run: their own (nested)
        # inference_mode / no_grad blocks interleave across switches, and each restores the
        # state it found, which is then always this one.
        with torch.inference_mode():
            while True:
                self._resume_ready()
                if self.sampler.parked:  # every ready request has sampled or parked a call
                    self.sampler.run()  # their next tokens, one pass; they run again
                    continue
                with self.cond:
                    batch = self._next_batch()
                    if batch is None:
                        return
                if batch:
                    self._run(batch)
                # Drop the last step's calls before waiting: they hold their requests' caches.
                batch = None

    def _resume_ready(self) -> None:
        """Resume every ready request until each has parked a call, paused or ended."""
        now = time.monotonic()
        due = [s for s in self.sleeping if s[0] <= now]
        if due:
            self.sleeping = [s for s in self.sleeping if s[0] > now]
            self.ready.extend(g for _, _, g in sorted(due))
        for _ in range(len(self.ready)):  # those that pause now run again next round
            glet = self.ready.popleft()
            if not glet.dead:
                glet.switch()

    def _next_batch(self) -> list[tuple[Call, int]] | None:
        """Under the lock: admit, expire, compose a forward; None when closed and idle."""
        while True:
            if self.closed and not self.running:
                return None
            now = time.monotonic()
            self._expire(now)
            if self._admit(now):
                return []  # new requests run their Python first, to join this forward
            if self.pending:
                return self._compose()
            if self.ready:
                return []  # paused requests (waiting for another's prefill) run again
            # Idle: the KV pool's buffers go after a while (KVPool.trim); wake up for that.
            pool = self.kv_pool
            wait = _POLL_S if (self.running or self.queue) else pool and pool.trim()
            if self.sleeping:
                wait = max(0.0, min(wait or _POLL_S, min(s[0] for s in self.sleeping) - now))
                if wait == 0.0:
                    return []
            self.cond.wait(wait)

    def _expire(self, now: float) -> None:
        from .. import pipeline as pl

        for req in [r for r in self.queue if r.expired(now)]:
            self.queue.remove(req)
            self.counters["cancelled"] += 1
            error: BaseException = pl.PipelineCancelled("cancelled while queued")
            if req.timed_out:
                error = timeout_error(req.request.timeout)
            req.send(("error", error))
        for call in [c for c in self.pending if c.req.expired(now)]:
            self.pending.remove(call)
            self._finish(call, error=Cancelled("decoding cancelled"))

    def _admit(self, now: float) -> bool:
        """Admit queued requests while there is room; True when any was admitted."""
        budget = self.limits.kv_budget_bytes
        admitted = False
        while self.queue and len(self.running) < self.limits.max_concurrent_requests:
            req = self.queue[0]
            if budget is not None and self.running and self.reserved + req.reserved > budget:
                break  # FIFO: the head waits for room, and so does everyone behind it
            self.queue.popleft()
            req.admitted = now
            self.running[req.seq] = req
            self.reserved += req.reserved
            glet = greenlet.greenlet(functools.partial(self._serve, req), parent=self.hub)
            req.glet = glet
            self.ready.append(glet)
            admitted = True
        return admitted

    def _finish(self, call: Call, logits=None, error: BaseException | None = None) -> None:
        """End ``call`` and make its request ready to run again."""
        glet = call.req.glet
        call.finish(logits, error)
        if glet is not None and not glet.dead:
            self.ready.append(glet)

    def _compose(self) -> list[tuple[Call, int]]:
        """Take calls for one forward, oldest request first, up to ``row_cap`` tokens."""
        batch, rows = [], 0
        self.pending.sort(key=lambda c: (c.chunkable, c.req.seq))  # decode steps before prefills
        for call in list(self.pending):
            room = self.row_cap - rows
            if room <= 0:
                break
            take = call.left
            if take > room:
                if call.chunkable:
                    take = room
                elif batch:
                    continue  # whole next step, alone if need be
            batch.append((call, take))
            rows += take
            if take == call.left:
                self.pending.remove(call)
        return batch

    def _run(self, batch: list[tuple[Call, int]]) -> None:
        """One forward over ``batch``; on failure, retry in halves so one bad call fails alone."""
        marks = [cache_mark(call) for call, _ in batch]
        try:
            outs = self._forward(batch)
        except Exception as e:
            for (call, _), mark in zip(batch, marks, strict=True):
                cache_restore(call, mark)
            if is_transient(e):
                with self.cond:
                    rows = sum(take for _, take in batch)
                    self.row_cap = max(1, min(self.row_cap, rows // 2))
                    self.good_steps = 0
            if len(batch) > 1:
                with self.cond:
                    self.counters["split_retries"] += 1
                half = len(batch) // 2
                self._run(batch[:half])
                self._run(batch[half:])
                return
            # Alone, the call fails as it would without batch-mates; its request decides
            # (Stage 2 decodes fewer branches at a time, the call retries with backoff).
            call, _ = batch[0]
            with self.cond, contextlib.suppress(ValueError):
                self.pending.remove(call)
            self._finish(call, error=e)
            return
        rows = sum(take for _, take in batch)
        with self.cond:
            # After an out-of-memory the cap halves; it grows back after a run of good steps.
            self.good_steps += 1
            if self.row_cap < self.limits.max_batch_rows and self.good_steps >= _REGROW_STEPS:
                self.row_cap = min(self.limits.max_batch_rows, self.row_cap * 2)
                self.good_steps = 0
            self.counters["steps"] += 1
            self.counters["rows"] += rows
            self.counters["max_rows"] = max(self.counters["max_rows"], rows)
            for call, take in batch:
                self.counters["rows_" + call.stage] += take
        for (call, take), logits in zip(batch, outs, strict=True):
            call.req.forwards += 1
            call.req.batch_rows += rows
            call.ran += take
            if call.left == 0:
                self._finish(call, logits)

    def _forward(self, batch: list[tuple[Call, int]]) -> list[torch.Tensor | None]:
        """The step's single forward: returns each call's kept logits (None for a chunk that
        does not end its prefill)."""
        # The request's threads (None: all usable), capped at the cores others leave free.
        wanted, free = batch[0][0].req.request.num_threads, self.cores.free_cores()
        apply_threads(free if wanted is None else min(wanted, free))
        step = pack_step(batch, self.base_impl)
        logits = forward_step(
            self.model, step, self.lean, self.configs, self.cache_kw, self.dummy_mask
        )
        return [None if s is None else logits[s[0] : s[1]] for s in step.spans]


def _by_stage(stages: Iterator[str]) -> dict[str, int]:
    counts = collections.Counter(stages)
    return {s: counts[s] for s in STAGES}


class Engine:
    """A model served to many callers at once (see the module docstring).

    Args:
        model: a transformers causal LM in eval mode; the engine owns its forwards while it
            lives (don't run other forwards on it from other threads at the same time).
        tokenizer: its tokenizer (with a chat template).
        name: model name for metadata.
        limits: ``EngineLimits``.
    """

    def __init__(
        self, model: Any, tokenizer: Any, name: str = "custom", limits: EngineLimits | None = None
    ) -> None:
        self._core = _Core(model, tokenizer, name, limits or EngineLimits())
        self.name = name
        # The exit handler stops every live scheduler (see _close_all).
        _CORES.add(self._core)
        weakref.finalize(self, _Core.close, self._core)

    @property
    def model(self) -> Any:
        """The served model."""
        return self._core.model

    @property
    def tokenizer(self) -> Any:
        """Its tokenizer."""
        return self._core.tokenizer

    @property
    def limits(self) -> EngineLimits:
        """The engine's limits."""
        return self._core.limits

    def stats(self) -> dict[str, Any]:
        """Requests running and queued, forwards, rows per forward, KV reserved and live."""
        return self._core.stats()

    def clear_prefix_cache(self) -> None:
        """Forget every stored prompt prefix (e.g. between benchmark phases)."""
        self._core.prefix.clear()

    def __copy__(self) -> Engine:
        return self  # shared: copies of a chat model keep serving through the same engine

    def __deepcopy__(self, memo: dict[int, Any]) -> Engine:
        return self

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called (a closed engine serves nothing more)."""
        return self._core.closed

    def close(self) -> None:
        """Cancel everything and stop the scheduler (also done when the engine is collected)."""
        self._core.close()

    def stream(self, request: Request) -> Iterator[Item]:
        """Run ``request``; yield ``("event", e)`` items then ``("done", AnswerResult)``."""
        core = self._core
        items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        req = core.submit(request, items.put)
        try:
            while True:
                try:
                    kind, value = items.get(timeout=_POLL_S)
                except queue.Empty:
                    if not core.alive():
                        raise RuntimeError("the engine's scheduler thread died") from None
                    continue
                if kind == "error":  # the request has ended (cancelling it is a no-op)
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            core.cancel(req)  # a caller that stopped early frees the request's rows and KV

    async def astream(self, request: Request) -> AsyncIterator[Item]:
        """Async ``stream``: the scheduler feeds an asyncio queue; no thread per call."""
        core = self._core
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def sink(item: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        req = core.submit(request, sink)
        getter: asyncio.Future | None = None
        try:
            while True:
                # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that races with the item arriving.
                if getter is None:
                    getter = asyncio.ensure_future(items.get())
                done, _ = await asyncio.wait({getter}, timeout=1.0)
                if not done:
                    if not core.alive():
                        raise RuntimeError("the engine's scheduler thread died")
                    continue
                kind, value = getter.result()
                getter = None
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            if getter is not None:
                getter.cancel()
            core.cancel(req)  # cancelled or closed early: free the request's rows and KV


_CORES: weakref.WeakSet[_Core] = weakref.WeakSet()
# The scheduler threads, joined at exit. A core can be gone from _CORES while its thread still
# runs: once an engine is collected, its scheduler stops and, ending, drops the last reference
# to the core and so frees the model's tensors. A daemon thread doing that while the
# interpreter finalizes aborts the process ("terminate called without an active exception").
_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Stop the schedulers before the interpreter tears down: a daemon thread inside a torch op
    # at exit aborts the process ("terminate called without an active exception").
    for core in list(_CORES):
        core.close()
    for thread in list(_THREADS):
        if thread is not threading.current_thread():
            thread.join(5.0)
