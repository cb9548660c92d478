"""Whole-batch sampling for the engine: every request's next-token choice of a step in one pass.

Contract: inside a request's coroutine the engine routes ``decoding.sampling.sample_next`` to
``RowSampler.park`` (``use_row_sampler``, set in that coroutine's own context): the request
parks its rows (logits ``[B, V]``, settings, generators) and is suspended. When every ready
request has parked a sample or a forward, the scheduler calls ``run()``: ONE argmax over all
greedy rows and ONE temperature / top-k / top-p / softmax pass over all sampled rows
(``decoding.sampling.sample_rows``), each row drawing from its own request's generator, so a
request gets the tokens it gets alone. A failing pass is redone call by call, so only the call
that fails alone sees its error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import greenlet
import torch

from ..decoding.sampling import SamplingParams, sample_rows

__all__ = ["RowSampler"]


class _Parked:
    """One ``sample_next`` call waiting for the step's pass."""

    __slots__ = ("error", "generators", "glet", "logits", "params", "tokens")

    def __init__(self, logits, params, generators, glet) -> None:
        self.logits = logits  # [B, V]
        self.params = params
        self.generators = generators
        self.glet = glet
        self.tokens: torch.Tensor | None = None  # [B] once sampled
        self.error: BaseException | None = None


class RowSampler:
    """The engine's side of whole-batch sampling (see the module docstring).

    Args:
        hub: a callable returning the scheduler's greenlet (switched to while parked).
        wake: called with a request's greenlet once its tokens are there.
    """

    def __init__(self, hub: Callable[[], Any], wake: Callable[[Any], None]) -> None:
        self._hub = hub
        self._wake = wake
        self.parked: list[_Parked] = []
        self.passes = 0
        self.rows = 0

    def park(
        self,
        logits: torch.Tensor,
        params: SamplingParams | Sequence[SamplingParams],
        generators: torch.Generator | Sequence[torch.Generator | None] | None = None,
    ) -> torch.Tensor:
        """From a request's coroutine: wait for this step's pass; return ``[B]`` token ids."""
        call = _Parked(logits, params, generators, greenlet.getcurrent())
        self.parked.append(call)
        while call.tokens is None and call.error is None:
            self._hub().switch()
        if call.error is not None:
            raise call.error
        return call.tokens

    def run(self) -> None:
        """On the scheduler: sample every parked call in one pass, then wake their requests."""
        calls, self.parked = self.parked, []
        if not calls:
            return
        try:
            self._together(calls)
        except Exception:  # e.g. NaN logits in one call: redo each alone, errors to their own
            for call in calls:
                try:
                    call.tokens = sample_rows(call.logits, call.params, call.generators)
                except Exception as e:
                    call.error = e
        for call in calls:
            call.logits = call.generators = None
            self._wake(call.glet)

    def _together(self, calls: list[_Parked]) -> None:
        rows: list[SamplingParams] = []
        gens: list[torch.Generator | None] = []
        shared = False  # a call whose rows all draw from one generator, in turn
        for call in calls:
            n = call.logits.shape[0]
            params = call.params
            rows += [params] * n if isinstance(params, SamplingParams) else list(params)
            g = call.generators
            if g is None or isinstance(g, torch.Generator):
                shared = shared or (g is not None and n > 1)
                gens += [g] * n
            else:
                gens += list(g)
        if shared or len(calls) == 1:  # nothing to batch, or a draw order only the call knows
            for call in calls:
                call.tokens = sample_rows(call.logits, call.params, call.generators)
            return
        # Upcasting to a common dtype is exact (half -> float32 -> float64), and sampling
        # upcasts anyway (argmax in float32, draws in float64).
        dtype = calls[0].logits.dtype
        for call in calls[1:]:
            dtype = torch.promote_types(dtype, call.logits.dtype)
        logits = torch.cat([call.logits.to(dtype) for call in calls])  # [R, V]
        tokens = sample_rows(logits, rows, gens)
        self.passes += 1
        self.rows += logits.shape[0]
        at = 0
        for call in calls:
            n = call.logits.shape[0]
            call.tokens = tokens[at : at + n]
            at += n
