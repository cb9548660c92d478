"""The retry policy: which errors are retried, how long it waits, and what stops it."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from langchain_parallel_reason.runtime.retry import is_transient, run_with_retries


def _flaky(errors: list[BaseException]) -> tuple[Callable[[], str], list[int]]:
    """An attempt that raises ``errors`` one per call, then returns "ok"; and its call count."""
    calls = [0]

    def attempt() -> str:
        calls[0] += 1
        if errors:
            raise errors.pop(0)
        return "ok"

    return attempt, calls


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), True),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"
            ),
            True,
        ),
        (MemoryError(), True),
        (ConnectionResetError("connection reset by peer"), True),
        (RuntimeError("probability tensor contains either `inf`, `nan` or element < 0"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (
            ValueError("out of memory"),
            False,
        ),  # a ValueError is the caller's input, whatever it says
        (NotImplementedError("flash_attention_2 cannot take a 4D mask"), False),
        (TimeoutError("deadline"), False),
    ],
)
def test_only_errors_that_can_pass_are_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_transient_errors_are_retried_with_exponential_backoff() -> None:
    waits: list[float] = []
    attempt, calls = _flaky([MemoryError()] * 6)
    assert run_with_retries(attempt, max_retries=6, sleep=waits.append) == "ok"
    assert calls[0] == 7
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0])


def test_max_retries_bounds_the_tries() -> None:
    attempt, calls = _flaky([MemoryError()] * 10)
    with pytest.raises(MemoryError):
        run_with_retries(attempt, max_retries=2, sleep=lambda _: None)
    assert calls[0] == 3


def test_an_error_that_recurs_is_raised_at_once() -> None:
    attempt, calls = _flaky([RuntimeError("shapes cannot be multiplied"), MemoryError()])
    with pytest.raises(RuntimeError, match="shapes"):
        run_with_retries(attempt, max_retries=10**9, sleep=lambda _: None)
    assert calls[0] == 1


def test_no_retry_once_may_retry_says_no() -> None:
    # E.g. text reached the caller already: a retry would send it twice.
    attempt, calls = _flaky([MemoryError(), MemoryError()])
    allowed = iter([True, False])
    with pytest.raises(MemoryError):
        run_with_retries(
            attempt, max_retries=5, may_retry=lambda: next(allowed), sleep=lambda _: None
        )
    assert calls[0] == 2


def test_no_retry_starts_past_the_deadline() -> None:
    attempt, calls = _flaky([MemoryError()] * 100)
    waits: list[float] = []
    deadline = time.monotonic() + 0.5
    with pytest.raises(MemoryError):
        run_with_retries(attempt, max_retries=10**9, deadline=deadline, sleep=waits.append)
    # The sleeps here return at once, so the clock barely moves: what stops the retries is
    # that the next backoff (0.8 s) would end past the deadline (0.5 s away).
    assert waits == pytest.approx([0.1, 0.2, 0.4])
    assert calls[0] == 4
