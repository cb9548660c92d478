"""Synchronous code that waits on an event loop, with no thread of its own (greenlets).

Contract: ``await run_sync(fn, *args)`` runs ``fn`` in a greenlet on the calling task; inside
it, ``wait_for(awaitable)`` suspends ``fn`` until the loop has the awaitable's result (other
tasks run meanwhile) and returns it, or raises its exception. A cancellation of the task is
raised inside ``fn`` at its current ``wait_for``, so its ``finally`` blocks run. This is how
the pipeline, written once as plain code, runs on a server's HTTP streams (SQLAlchemy's
asyncio layer bridges its sync core the same way).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import greenlet

__all__ = ["in_bridge", "run_sync", "wait_for"]

_T = TypeVar("_T")


class _Bridged(greenlet.greenlet):
    """A greenlet whose parent awaits what it hands up."""


async def run_sync(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(*args)`` to its end, awaiting on its behalf (see the module docstring)."""
    glet = _Bridged(fn)
    handed = glet.switch(*args)
    while not glet.dead:
        try:
            result = await handed
        except BaseException as e:
            handed = glet.throw(e)
        else:
            handed = glet.switch(result)
    return handed


def in_bridge() -> bool:
    """Whether the caller runs inside ``run_sync`` (so ``wait_for`` may be called)."""
    try:
        return isinstance(greenlet.getcurrent(), _Bridged)
    except RuntimeError:  # the greenlet is being finalized (e.g. at exit)
        return False


def wait_for(awaitable: Awaitable[_T]) -> _T:
    """The result of ``awaitable``, awaited on the event loop of the enclosing ``run_sync``."""
    if not in_bridge():
        close = getattr(awaitable, "close", None)
        if close is not None:
            close()  # a coroutine never awaited: no "never awaited" warning
        msg = "wait_for() is only usable inside run_sync()"
        raise RuntimeError(msg)
    return greenlet.getcurrent().parent.switch(awaitable)
