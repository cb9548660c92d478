"""The route: the model's own yes/no on whether the question splits into parallel steps.

Contract: ``route_by_model(run)`` yields a ``RouteEvent`` (none when the question
cannot be routed) and returns True to plan; ``choose_route`` runs only that decision (for benchmarks) with the same settings.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import torch

from ..prompts import (
    route_question,
)
from ..titles import lists_parallel_items
from .events import Event, RouteEvent, drive
from .render import check_question, render_prompt
from .run import Run
from .settings import PipelineConfig

__all__ = [
    "LIST_LEAN",
    "choose_route",
    "route_by_model",
]


LIST_LEAN = 1.0
"""Log-odds added to the router's yes when the question lists 2 or more parts
(`titles.lists_parallel_items`): such a question has parts to answer side by side, and the
plan's titles are then the question's own words."""


def choose_route(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    config: PipelineConfig | None = None,
) -> tuple[str, str | None]:
    """(route, reason) that ``iter_answer`` would take for ``messages``, without answering:
    the router's choice in mode "auto" without ``steps`` (one forward), else what the
    settings force."""
    check_question(messages)
    run = Run(model, tokenizer, messages, config or PipelineConfig(), None, None)
    if run.cfg.mode == "auto" and run.route_reason is None:
        drive(route_by_model(run))
    return run.route, run.route_reason


class _YesNo:
    """The router's ``LogitsConstraint``: one token, the first of "yes" or "no" (either case),
    with ``bias`` added to the yes tokens. ``log_odds`` keeps the model's own (unbiased) best
    yes logit minus its best no logit."""

    def __init__(self, yes: list[int], no: list[int], bias: float) -> None:
        self.yes, self.no, self.bias = yes, no, bias
        self.choice_ids = [*yes, *no]  # a backend that cannot mask logits asks for these only
        self.log_odds = 0.0
        self.done = False

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Everything but the yes/no tokens at -inf; ``logits``: ``[V]``."""
        yes, no = logits[self.yes], logits[self.no]
        self.log_odds = float(yes.max() - no.max())
        out = torch.full_like(logits, float("-inf"))
        out[self.yes] = yes + self.bias
        out[self.no] = no
        return out

    def advance(self, token_id: int) -> None:
        """The choice is made."""
        self.done = True

    def is_terminated(self) -> bool:
        """After the one token."""
        return self.done


def _yes_no_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """First tokens of "Yes"/"yes" and of "No"/"no" (empty lists when they overlap)."""

    def firsts(*words: str) -> set[int]:
        return {tokenizer.encode(w, add_special_tokens=False)[0] for w in words}

    yes, no = firsts("Yes", "yes"), firsts("No", "no")
    return ([], []) if yes & no else (sorted(yes), sorted(no))


def route_by_model(run: Run) -> Generator[Event, None, bool]:
    """The router of mode "auto": the model answers yes (plan) or no (direct answer) to
    ``route_question(last user message)``, in a cache of its own; returns True to plan.

    One forward over a short prompt (the question and one line): a separate question rather
    than a first choice inside the Stage-1 grammar, because SmolLM2-135M, shown both a plan
    and a direct example in the planning prompt, chose the plan for 21 of 22 single-answer
    questions, while this yes/no separates the two kinds (README, "Route").
    """
    cfg = run.cfg
    t = time.perf_counter()
    user = [m for m in run.messages if m.get("role") == "user"]
    question = str(user[-1].get("content") or "").strip() if user else ""
    yes, no = _yes_no_ids(run.tok)
    prompt = []
    if question and yes:
        prompt = render_prompt(
            run.tok,
            [{"role": "user", "content": route_question(question)}],
            parse_special_tokens=cfg.parse_special_tokens,
        )
    if not prompt or len(prompt) >= run.ctx:
        why = "no user question" if not question else "the tokenizer cannot tell yes from no"
        if prompt:
            why = f"the routing question ({len(prompt)} tokens) does not fit the context window"
        run.route_reason = f"not routed ({why}): planned"
        return True
    lean = LIST_LEAN if lists_parallel_items(question) else 0.0
    choice = _YesNo(yes, no, cfg.route_bias + lean)
    gen = run.backend.iter_decode(
        prompt,
        run.backend.new_cache(),
        start=0,
        max_new_tokens=1,
        params=run.params,
        seed=cfg.seed,
        constraint=choice,
        cancel=run.cancel,
    )
    plan = drive(gen).token_ids[0] in yes
    run.route = "plan" if plan else "direct"
    run.route_reason = (
        f"the model answered {'yes' if plan else 'no'} to 'should the answer be split into "
        f"several independent parts?' (log-odds yes-no {choice.log_odds:+.2f}, "
        f"route_bias {cfg.route_bias:+.2f}"
        + (f", the question lists its parts {lean:+.2f}" if lean else "")
        + ")"
    )
    run.timings["route"] = time.perf_counter() - t
    yield RouteEvent(run.route, run.route_reason)
    return plan
