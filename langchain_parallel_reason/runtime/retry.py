"""Which failures of a call are retried, and how often (no LangChain here).

Contract: ``run_with_retries(attempt, max_retries=..., deadline=..., may_retry=...)`` calls
``attempt()`` and, when it raises an error that can pass (``is_transient``), calls it again after
an exponential backoff (0.1 s, 0.2 s, 0.4 s ... capped at 2 s), at most ``max_retries`` times. A
retry is not made when ``may_retry()`` says no (text already reached the caller, or the call was
cancelled), or when its backoff would end past ``deadline``: the last error is raised then.
Every other error is raised at once: it would recur on the same input (a ValueError, a shape or
NaN error from torch) and retrying it only spins. Engines (today's worker thread and the
batching engine) call this one function.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

__all__ = ["BACKOFF_MAX_S", "BACKOFF_S", "is_transient", "run_with_retries"]

T = TypeVar("T")

BACKOFF_S = 0.1
"""Wait before the first retry; each further retry waits twice as long."""
BACKOFF_MAX_S = 2.0
"""Longest wait between two attempts."""

# How torch and the allocators word an out-of-memory error raised as a plain RuntimeError
# (torch.OutOfMemoryError, a RuntimeError, says "out of memory" as well).
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed")


def is_transient(error: BaseException) -> bool:
    """True for an error that can pass on a later try: out of memory, a dropped connection.

    Memory held by other calls is freed when they end, and a remote server comes back; any
    other error (bad input, a torch error from shapes or numbers) recurs on the same input.
    """
    if isinstance(error, MemoryError | ConnectionError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _OUT_OF_MEMORY)


def run_with_retries(
    attempt: Callable[[], T],
    *,
    max_retries: int,
    deadline: float | None = None,
    may_retry: Callable[[], bool] = lambda: True,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """``attempt()``'s result, retrying transient errors (see the module docstring).

    Args:
        attempt: one try of the whole call, from scratch.
        max_retries: most retries after the first try (0 = try once).
        deadline: ``time.monotonic()`` after which no retry starts; None = no limit.
        may_retry: asked after a transient failure; False stops (e.g. text was sent already).
        sleep: waits between tries; pass an interruptible wait (``threading.Event.wait``) so
            cancelling a call does not wait out its backoff.

    Raises:
        The last error of ``attempt`` when it is not retried.
    """

    def past_deadline(state: object) -> bool:
        upcoming = getattr(state, "upcoming_sleep", 0.0)
        return deadline is not None and time.monotonic() + upcoming >= deadline

    retrying = Retrying(
        stop=stop_after_attempt(max_retries + 1) | past_deadline,
        wait=wait_exponential(multiplier=BACKOFF_S, min=BACKOFF_S, max=BACKOFF_MAX_S),
        retry=retry_if_exception(lambda e: is_transient(e) and may_retry()),
        sleep=sleep,
        reraise=True,
    )
    return retrying(attempt)
