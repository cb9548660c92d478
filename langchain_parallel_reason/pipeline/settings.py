"""The pipeline's settings: ``PipelineConfig`` (one frozen dataclass, validated once), the
output grammar, the bounds and defaults the stages share, and the routes the settings force.

Contract: nothing here touches a model; ``forced_route(config)`` says whether the settings alone
fix the route (``"parallel"``, ``"sequential"`` with its reason, or ``"auto"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..decoding.repetition import RepetitionControl
from ..decoding.sampling import SamplingParams
from ..setting_bounds import FLOAT_BOUNDS, INT_BOUNDS

__all__ = [
    "CHECK_SLACK_TOKENS",
    "MIN_CONCLUSION_TOKENS",
    "MIN_PLAN_TOKENS",
    "MIN_STEP_TOKENS",
    "PLAN_PREAMBLE_CHARS",
    "PLAN_RETRY_TEMPERATURES",
    "PLAN_TITLE_CHARS",
    "ROUTE_BIAS",
    "Mode",
    "OutputGrammar",
    "PipelineCancelled",
    "PipelineConfig",
    "forced_route",
    "sequential_reason",
]


Mode = Literal["auto", "parallel", "sequential", "stepped"]


# Fewest new tokens a parallel step gets before the context/max_tokens budget makes parallel
# decoding pointless; below it the answer is decoded sequentially and the reason recorded.
MIN_STEP_TOKENS = 8


# A check step copies the rest of its record's line: it may write that many tokens and this
# many more (a remark, a re-tokenization), then it ends at its budget.
CHECK_SLACK_TOKENS = 6


PLAN_TITLE_CHARS = 28  # one to three words; a long title is a step written too early


PLAN_PREAMBLE_CHARS = 100  # one short line: a long preamble crowds the titles out of the budget


# The conclusion cannot end (EOS, a step marker) before this many tokens: right after the steps
# a small model otherwise closes the answer at once, leaving it without a conclusion.
MIN_CONCLUSION_TOKENS = 12


# Fewest tokens a plan attempt may get: a preamble, two short titles and the end marker. A
# retry with fewer would be cut off for sure, so it is not made.
MIN_PLAN_TOKENS = 16


# Plan retries explore: attempt k >= 2 samples at PLAN_RETRY_TEMPERATURES[k - 2] (the last one
# for later attempts), or the caller's temperature when higher, with seed base + k.
PLAN_RETRY_TEMPERATURES = (0.5, 0.7, 0.9, 1.0)


# The router's default bias towards "yes" (plan), in logits. SmolLM2-135M leans to "no": its
# yes-no log-odds averaged -0.13 on parallelizable and -0.97 on single-answer questions of
# `bench questions`; +0.75 splits them best there (README, "Route"). Another model may need
# another value: `route_bias` is a setting.
ROUTE_BIAS = 0.75


class PipelineCancelled(Exception):  # noqa: N818 - mirrors asyncio.CancelledError
    """The caller's cancel event was set; decoding stopped at the next forward pass."""


@dataclass(frozen=True)
class OutputGrammar:
    """A grammar the whole answer must match: a forced tool call or structured output.

    The answer is ``prefix`` (prefilled after the prompt, as if the model had written it),
    then text decoded under ``json_schema`` (JSON text) or ``ebnf`` (xgrammar EBNF), then
    ``suffix``, appended once the grammar is complete (not when the budget ran out first).
    Stop strings do not apply: the grammar decides where the answer ends.
    """

    json_schema: str | None = None
    ebnf: str | None = None
    prefix: str = ""
    suffix: str = ""

    def __post_init__(self) -> None:
        if (self.json_schema is None) == (self.ebnf is None):
            raise ValueError("OutputGrammar takes exactly one of json_schema and ebnf")


@dataclass(frozen=True)
class PipelineConfig:
    """Per-call decoding settings (mapped from the chat model's fields in one place).

    Attributes:
        mode: "auto" (parallel when the plan validates), "parallel" (same, but a fallback is
            reported as a failure of the requested mode), "sequential" (no plan at all),
            "stepped" (the paper's baseline: the same plan, its steps written one after
            another in one sequence by ordinary decoding under the same step rules, then the
            same conclusion).
        steps: caller-given step titles; Stage 1 is skipped.
        max_branches: most parallel steps (>= 2).
        max_tokens: new-token budget of the whole answer (plan + steps + conclusion).
        step_max_tokens: new tokens per parallel step.
        plan_max_tokens: new tokens for the Stage-1 plan.
        plan_retries: re-samples of a plan that does not validate, before falling back (also
            bounded by ``max_tokens``: plan attempts spend at most half of it).
        temperature, top_p, top_k, seed: sampling (temperature 0 is greedy).
        repetition_penalty, no_repeat_ngram_size: as in transformers' ``generate``, applied to
            each step (over its own context) and to the conclusion or sequential answer;
            None = off; outside [0.01, 100] refused (``setting_bounds.FLOAT_BOUNDS``).
        stop: stop strings; one inside a step ends that step only, one in the conclusion or a
            sequential answer ends the answer.
        attention: Stage-2 backend, "auto", "split" or "mask".
        conclusion_kv: how Stage 3 gets the parallel steps into the cache: "reprefill" (their
            text is prefilled after the prefix, as the paper does) or "reuse" (their own KV from
            Stage 2 is laid out in a row, keys re-rotated, see ``decoding.merge``; models it
            does not support re-prefill, with a note).
        constrain_plan: force the plan's shape with a grammar (xgrammar).
        grammar: the whole answer must match this grammar (decoded sequentially).
        sequential_reason: decode sequentially for this reason, recorded in the report as
            ``fallback_reason`` (e.g. tools are bound); ignored when mode is "sequential".
        parse_special_tokens: read text in messages, tool output and step titles that spells
            a special token (e.g. ``<|im_end|>``) as that token; by default it is plain text.
        max_blocks: most parallel blocks in one answer. After a block's conclusion the model
            may open another plan by writing ``####``; while fewer than ``max_blocks`` blocks
            ran (and budget is left) that plan is decoded and its steps run in parallel, else
            the conclusion ends there. 1 = one block.
        route_bias: in mode "auto" without ``steps``, a router first asks the model whether
            the question should be split into independent parts; "yes" plans, "no" answers
            directly (ordinary decoding, not a fallback). This is added to the "yes" logit
            before that choice (higher: plan more often); past +-1e4 refused.
    """

    mode: Mode = "auto"
    steps: tuple[str, ...] | None = None
    max_branches: int = 6
    max_tokens: int = 512
    step_max_tokens: int = 96
    plan_max_tokens: int = 96
    plan_retries: int = 2
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    stop: tuple[str, ...] = ()
    attention: Literal["auto", "split", "mask"] = "auto"
    conclusion_kv: Literal["reprefill", "reuse"] = "reprefill"
    constrain_plan: bool = True
    grammar: OutputGrammar | None = None
    sequential_reason: str | None = None
    parse_special_tokens: bool = False
    max_blocks: int = 1
    route_bias: float = ROUTE_BIAS

    def __post_init__(self) -> None:
        SamplingParams(self.temperature, self.top_p, self.top_k)  # validates
        RepetitionControl(self.repetition_penalty, self.no_repeat_ngram_size)  # validates
        checks = [
            (
                self.mode in ("auto", "parallel", "sequential", "stepped"),
                "mode must be auto|parallel|sequential|stepped",
            ),
            (
                self.conclusion_kv in ("reprefill", "reuse"),
                "conclusion_kv must be reprefill|reuse",
            ),
            (
                math.isfinite(self.route_bias),
                f"route_bias must be a finite number, got {self.route_bias}",
            ),
        ]
        for name, (low, high) in (INT_BOUNDS | FLOAT_BOUNDS).items():
            value = getattr(self, name)
            if value is None:  # repetition_penalty: off
                continue
            checks.append((value >= low, f"{name} must be >= {low}, got {value}"))
            if high is not None:
                checks.append((value <= high, f"{name} must be <= {high}, got {value}"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


def sequential_reason(config: PipelineConfig) -> str | None:
    """Why a call that may plan is decoded sequentially anyway (tools, an output grammar)."""
    if config.sequential_reason is None and config.grammar is not None:
        return "an output grammar is set: the answer is decoded sequentially"
    return config.sequential_reason


def forced_route(config: PipelineConfig) -> tuple[str, str | None]:
    """(route, reason) of a call whose route the settings decide; in mode "auto" without
    ``steps``, ("plan", None) until the router (`route`) decides."""
    if config.mode == "sequential":
        return "direct", "mode='sequential' never plans"
    if (reason := sequential_reason(config)) is not None:
        return "direct", reason
    if config.steps is not None:
        return "plan", "steps= given: the caller's plan"
    if config.mode != "auto":
        return "plan", f"mode={config.mode!r} always plans"
    return "plan", None
