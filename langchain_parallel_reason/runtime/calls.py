"""What the scheduler moves around: calls (one forward each), submitted requests, the model view.

Contract: a ``ModelView`` is what a request's pipeline sees as the model. Its forward does not run
the model: it wraps the inputs in a ``Call`` and hands it to the engine (``core.run_call``), which
runs it batched with the calls of other requests and returns the call's logits. A ``Submission``
is a request inside the engine (its sink, cancel flag, deadline, counters). The helpers say
which calls the prefix cache can serve and how to undo a failed forward on a call's cache.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from ..decoding.cache import crop_to
from .base import Item, Request
from .kv import adopt_slabs
from .stage_tags import call_stage

__all__ = [
    "Call",
    "ModelView",
    "Submission",
    "cache_mark",
    "cache_restore",
    "drop_tracebacks",
    "fresh_prefill",
    "kv_bytes_per_token",
    "kv_reservation",
    "timeout_error",
    "with_engine_report",
]


class Call:
    """One forward a request asked for; the worker waits on ``done``.

    ``ids``/``positions`` are ``[S]``; ``keep`` indexes the rows whose logits come back (None =
    all). A plain prefill (no mask, no branch layout, last row kept) may run in chunks: ``ran``
    counts the tokens already in its cache.
    """

    __slots__ = (
        "cache",
        "done",
        "error",
        "ids",
        "keep",
        "logits",
        "mask",
        "positions",
        "ran",
        "req",
        "split",
        "stage",
    )

    def __init__(self, req, ids, positions, cache, mask, split, keep) -> None:
        self.req = req
        self.ids = ids
        self.positions = positions
        self.cache = cache
        self.mask = mask
        self.split = split
        self.keep = keep
        self.ran = 0
        # Which stage of its request this forward is for (runtime/stage_tags.py).
        self.stage = call_stage(req.stage, split)
        self.done = threading.Event()
        self.logits: torch.Tensor | None = None
        self.error: BaseException | None = None

    @property
    def chunkable(self) -> bool:
        return (
            self.split is None
            and self.mask is None
            and self.keep is not None
            and self.keep.numel() == 1
            and int(self.keep[0]) == self.ids.shape[0] - 1
        )

    @property
    def left(self) -> int:
        return self.ids.shape[0] - self.ran

    def finish(self, logits: torch.Tensor | None = None, error: BaseException | None = None):
        # Let go of the request's cache first: the scheduler may still hold this call a
        # moment after the worker (and the caller) moved on.
        self.cache = self.mask = self.split = None
        self.logits, self.error = logits, error
        self.done.set()


class Submission:
    """A submitted request: its sink, flags, timings and the call it waits on."""

    def __init__(self, request: Request, sink: Callable[[Item | tuple[str, Any]], None], seq: int):
        self.request = request
        self.sink = sink
        self.seq = seq
        self.cancel = threading.Event()
        self.submitted = time.monotonic()
        self.deadline = None if request.timeout is None else self.submitted + request.timeout
        self.timed_out = False
        self.admitted: float | None = None
        self.queued_ahead = 0
        self.reserved = 0
        self.call: Call | None = None
        self.glet: Any = None  # the engine's coroutine running this request (a greenlet)
        self.cache_ref: Callable[[], Any] = lambda: None  # the last cache it ran on (weak)
        self.forwards = 0
        self.batch_rows = 0
        self.prefix_hit_tokens = 0
        self.stage = "route"  # the stage its next forward is for (runtime/stage_tags.py)

    def expired(self, now: float) -> bool:
        if self.deadline is not None and now >= self.deadline:
            self.timed_out = True
        return self.timed_out or self.cancel.is_set()

    def send(self, item: tuple[str, Any]) -> None:
        try:
            self.sink(item)
        except RuntimeError:  # the caller's event loop is closed: nobody listens any more
            self.cancel.set()


class ModelView:
    """What a request's pipeline sees as the model: attributes are the model's, forwards are
    handed to the scheduler (``decoding`` checks ``batches_forwards`` to leave attention alone)."""

    batches_forwards = True

    def __init__(self, core: Any, req: Submission) -> None:  # core: the engine's _Core
        self._core = core
        self._req = req
        self.base_attn_implementation = core.base_impl
        # A request's own multi-row forwards (Stage 2) keep under the engine's row cap.
        self.max_rows = core.limits.max_batch_rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core.model, name)

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Any = None,
        past_key_values: Any = None,
        cache: Any = None,
        use_cache: bool = True,
        logits_to_keep: Any = None,
        belt_layout: Any = None,
        **kwargs: Any,
    ) -> SimpleNamespace:
        store = cache if cache is not None else past_key_values
        if store is None:
            raise ValueError("the engine needs the caller's cache (past_key_values)")
        pools = self._core.kv_pool  # a new cache grows in place, not by a copy per step
        adopt_slabs(store, None if pools is None else pools.for_prompt(input_ids.shape[-1]))
        if isinstance(logits_to_keep, int):
            n = input_ids.shape[-1]
            logits_to_keep = None if logits_to_keep == 0 else torch.arange(n - logits_to_keep, n)
        call = Call(
            self._req,
            input_ids.reshape(-1),
            position_ids.reshape(-1),
            store,
            None if belt_layout is not None else attention_mask,
            belt_layout,
            None if logits_to_keep is None else torch.as_tensor(logits_to_keep).reshape(-1),
        )
        return SimpleNamespace(logits=self._core.run_call(call)[None])

    # decoding.cache_kwarg reads the forward's signature from the class: it takes ``cache``.
    forward = __call__


def kv_bytes_per_token(model: Any) -> int:
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    layers = int(getattr(config, "num_hidden_layers", 1))
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    size = next(model.parameters()).element_size()
    return 2 * layers * heads * dim * size


def fresh_prefill(call: Call) -> DynamicCache | None:
    """The call's cache when the call prefills a prompt from its first token into an empty
    plain cache (what the prefix cache can serve and store), else None."""
    cache = call.cache
    if (
        type(cache) is DynamicCache
        and call.chunkable
        and call.ids.shape[0] > 1
        and int(call.positions[0]) == 0
        and cache.get_seq_length() == 0
    ):
        return cache
    return None


def cache_mark(call: Call) -> int | None:
    """What to roll a call's cache back to if the forward fails (None: nothing to undo)."""
    if call.split is not None:
        return None  # branch slots are written in place: a retry writes the same slots again
    return call.cache.get_seq_length()


def cache_restore(call: Call, mark: int | None) -> None:
    if mark is not None:
        crop_to(call.cache, mark)


def drop_tracebacks(error: BaseException | None) -> None:
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]


def timeout_error(timeout: float | None) -> TimeoutError:
    msg = (
        f"ChatParallelReason did not finish within timeout={timeout} s and was cancelled; "
        "raise `timeout` or lower `max_tokens` (the model is free again)"
    )
    return TimeoutError(msg)


def kv_reservation(request: Request, tokenizer: Any, kv_per_token: int, limits: Any) -> int:
    """Upper bound of the KV bytes a request holds: its messages, the planning prompt and
    step layout (a generous 512 tokens), and everything it may write (0 without a budget)."""
    if limits.kv_budget_bytes is None:
        return 0
    text = " ".join(str(m.get("content") or "") for m in request.messages)
    tokens = len(tokenizer.encode(text, add_special_tokens=False)) + 512
    tokens += int(getattr(request.config, "max_tokens", 512))
    return tokens * kv_per_token


def with_engine_report(req: Submission, result: Any, batch_invariant: bool | None = None) -> Any:
    """``result`` with the engine's part of the report: queue wait, forwards, prefix hits, and
    whether the model's dtype keeps answers batch-invariant."""
    info = {
        "queue_wait_s": round((req.admitted or req.submitted) - req.submitted, 4),
        "queued_ahead": req.queued_ahead,
        "forwards": req.forwards,
        "prefix_hit_tokens": req.prefix_hit_tokens,
        "mean_batch_rows": round(req.batch_rows / req.forwards, 2) if req.forwards else 0.0,
    }
    update: dict[str, Any] = {"engine": info}
    if batch_invariant is not None:
        update["batch_invariant"] = batch_invariant
    report = result.report.model_copy(update=update)  # validated on creation
    return dataclasses.replace(result, report=report)
