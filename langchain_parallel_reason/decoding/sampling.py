"""Next-token selection as pure functions over logits.

Contract: ``sample_next(logits, params, generator)`` maps logits ``[B, V]`` to token ids ``[B]``
(each row may have its own settings and generator: ``sample_rows``, one pass over all rows);
``SamplingParams`` and ``SuppressFirst`` are how both decode loops take their sampling rules.
Temperature 0 is argmax (no randomness consumed); otherwise top-k, then top-p (nucleus), then a
multinomial draw from the caller's ``torch.Generator``, so a seed reproduces the draw exactly.
Numerically safe for every finite temperature > 0 and top_p in (0, 1]: the math runs in float64
on logits shifted so the best token scores 0, so a tiny temperature tends to argmax (ties share
the draw) and a huge one to uniform, never to inf or NaN; the most likely token always survives
top-p.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "SamplingParams",
    "SuppressFirst",
    "make_generator",
    "sample_next",
    "sample_rows",
    "use_row_sampler",
]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    Attributes:
        temperature: 0 means greedy (argmax); > 0 divides the logits before sampling.
        top_p: nucleus mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # NaN fails too
            msg = f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            raise ValueError(msg)
        if not 0.0 < self.top_p <= 1.0:
            msg = f"top_p must be in (0, 1], got {self.top_p}; use 1.0 to disable nucleus sampling"
            raise ValueError(msg)
        if self.top_k < 0:
            msg = f"top_k must be >= 0 (0 disables it), got {self.top_k}"
            raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (temperature 0)."""
        return self.temperature == 0.0


@dataclass(frozen=True)
class SuppressFirst:
    """Ban ``token_ids`` while a sequence has fewer than ``count`` new tokens, and
    ``first_ids`` for its first new token only.

    The one way both loops delay tokens (``iter_decode(suppress=...)``,
    ``iter_decode_branches(suppress=...)``), e.g. so a small model cannot end a step at once
    with EOS or the next step marker, nor open it with another step's title (``first_ids``:
    what ``iter_decode_branches(opening_banned_ids=...)`` does per branch). Nothing is banned
    implicitly: list the stop ids here to keep a sequence from stopping early (what
    ``generate``'s ``min_new_tokens`` does for EOS).

    Attributes:
        token_ids: the banned ids (stored sorted, without repeats).
        count: new tokens a sequence must have before they are allowed (0: never banned).
        first_ids: ids the first new token may not be (stored sorted, without repeats).
    """

    token_ids: Sequence[int]
    count: int
    first_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_ids", tuple(sorted({int(t) for t in self.token_ids})))
        object.__setattr__(self, "first_ids", tuple(sorted({int(t) for t in self.first_ids})))
        if self.count < 0:
            msg = f"SuppressFirst count must be >= 0 new tokens, got {self.count}"
            raise ValueError(msg)

    def banned(self, produced: int) -> tuple[int, ...]:
        """The ids a sequence with ``produced`` new tokens may not pick next (sorted)."""
        ids = self.token_ids if produced < self.count else ()
        if produced == 0 and self.first_ids:
            ids = tuple(sorted({*ids, *self.first_ids}))
        return ids

    def active(self, produced: int) -> bool:
        """True while a sequence with ``produced`` new tokens has some id banned."""
        return bool(self.banned(produced))

    def apply(self, logits: torch.Tensor, produced: Sequence[int]) -> None:
        """Set row i's banned ids (after ``produced[i]`` new tokens) of ``logits`` ``[B, V]``
        to -inf, in place."""
        rows_of: dict[tuple[int, ...], list[int]] = {}  # at most two groups: first, young
        for row, n in enumerate(produced):
            if ids := self.banned(n):
                rows_of.setdefault(ids, []).append(row)
        for ids, rows in rows_of.items():
            r = torch.tensor(rows, device=logits.device)
            banned = torch.tensor(ids, device=logits.device)
            logits[r[:, None], banned[None, :]] = float("-inf")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (a fresh random seed when None)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    # Half-precision argmax has no fast CPU kernel: float32 (exact for these values) was
    # 4.2 -> 0.8 ms at 16 rows and 8.5 -> 2.3 ms at 48 rows here (vocabulary 49152).
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return logits.argmax(dim=-1)


def _filter_top_k(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    # scores: [B, V]; k: [B] with 0 = off. Row i keeps the values at or above its k-th largest.
    vocab = scores.shape[-1]
    k = k.clamp(max=vocab)
    top = torch.topk(scores, int(k.max()), dim=-1).values  # [B, max k], descending
    kth = top.gather(-1, (k - 1).clamp(min=0)[:, None])  # [B, 1]
    kth = kth.masked_fill((k == 0)[:, None], float("-inf"))
    return scores.masked_fill(scores < kth, float("-inf"))


def _filter_top_p(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    # scores: [B, V]; p: [B] with 1 = off. Keep the smallest set of tokens whose mass reaches p
    # (the most likely token always stays).
    sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
    probs = sorted_scores.softmax(dim=-1)
    # Mass strictly before each token: a token is dropped when that mass already reaches p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p[:, None]
    # Explicitly: a p below the dtype's smallest number (1e-300 in float32 is 0) would drop it.
    drop_sorted[..., 0] = False
    drop_sorted &= (p < 1.0)[:, None]  # rows without nucleus sampling keep every token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def _draw(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: torch.Generator | Sequence[torch.Generator | None] | None,
) -> torch.Tensor:
    """One temperature / top-k / top-p pass over every row of ``logits`` ``[B, V]`` (each row
    with its own settings), then each row's draw from its own generator."""
    device = logits.device
    # float64, and the best logit moved to 0 before dividing: (x - max) / t is 0 for the best
    # token and <= 0 (or -inf) for the rest for any finite t > 0, so the softmax below never
    # sees inf - inf. In float32, t = 1e-300 made every score inf and t = 3.5e38 (above the
    # float32 range) made -inf masks NaN: torch.multinomial then raised. A +inf logit (a
    # half-precision model overflowing) is clamped to float64's largest number first: the
    # overflowed tokens share the draw instead of making it NaN; -inf stays a mask.
    scores = logits.double().clamp(max=torch.finfo(torch.float64).max)
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float64)
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / temperature.to(device)[:, None]
    if any(p.top_k for p in params):
        scores = _filter_top_k(scores, torch.tensor([p.top_k for p in params], device=device))
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device)
        scores = _filter_top_p(scores, top_p)
    probs = scores.softmax(dim=-1)  # [B, V]
    if generators is None or isinstance(generators, torch.Generator):
        return torch.multinomial(probs, num_samples=1, generator=generators).squeeze(-1)
    # Row i draws from its own generator only: its tokens do not depend on the other rows.
    return torch.cat(
        [
            torch.multinomial(probs[i : i + 1], num_samples=1, generator=g).squeeze(-1)
            for i, g in enumerate(generators)
        ]
    )


def sample_rows(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generators: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Choose one token per row, each row with its own settings and generator, in one pass.

    Args:
        logits: ``[B, V]`` raw logits (any float dtype; sampling math runs in float64).
        params: one ``SamplingParams`` for every row, or one per row.
        generators: one generator all sampled rows draw from in turn (or None), or one per
            row (ignored for greedy rows).

    Returns:
        ``[B]`` int64 token ids. Greedy rows take ONE argmax together; sampled rows one
        temperature / top-k / top-p / softmax pass together. Every op works row by row, so a
        row gets the same token as it would alone, whatever rows share its pass.
    """
    rows = logits.shape[0]
    per_row = [params] * rows if isinstance(params, SamplingParams) else list(params)
    if len(per_row) != rows:
        msg = f"sample_rows got {len(per_row)} sampling settings for {rows} rows"
        raise ValueError(msg)
    greedy = [p.greedy for p in per_row]
    if all(greedy):
        return _argmax(logits)
    gens = generators
    if all(not g for g in greedy):
        return _draw(logits, per_row, gens)
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    pick = [i for i, g in enumerate(greedy) if g]
    out[pick] = _argmax(logits[pick])
    draw = [i for i, g in enumerate(greedy) if not g]
    if gens is not None and not isinstance(gens, torch.Generator):
        gens = [gens[i] for i in draw]
    out[draw] = _draw(logits[draw], [per_row[i] for i in draw], gens)
    return out


# A request's coroutine inside the engine sets this (in its own context) to hand its sampling
# to the engine, which samples every request's rows of a forward in one pass.
_ROW_SAMPLER: contextvars.ContextVar[Callable[..., torch.Tensor] | None] = contextvars.ContextVar(
    "parallel_reason_row_sampler", default=None
)


def use_row_sampler(sampler: Callable[..., torch.Tensor] | None) -> None:
    """Route this context's ``sample_next`` calls to ``sampler(logits, params, generators)``
    (what the engine does inside each request's coroutine); None restores direct sampling."""
    _ROW_SAMPLER.set(sampler)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """``sample_rows(logits, params, generator)``: the same arguments and ``[B]`` token ids,
    handed to the engine's batched sampler when this context has one (``use_row_sampler``)."""
    sampler = _ROW_SAMPLER.get()
    if sampler is not None:
        return sampler(logits, params, generator)
    return sample_rows(logits, params, generator)
