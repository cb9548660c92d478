"""The entry points: ``iter_answer`` dispatches one call to the route, the parallel stages
or sequential decoding (the fallback of every failure), and ``answer`` drives it to the end.

Contract: see the package docstring (``langchain_parallel_reason.pipeline``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from dataclasses import replace
from typing import Any

import torch

from ..decoding.sequential import Cancelled
from ..plan import PlanFormatError, format_plan
from ..prompts import echo_words, stage1_system_prompt
from ..schemas import ParallelReport, Plan
from .blocks import run_blocks
from .events import (
    AnswerResult,
    ContentDelta,
    Event,
    FallbackEvent,
    PlanEvent,
    TextStream,
    drive,
    stream_content,
)
from .render import check_question, render_prompt, whole_sentences, with_system
from .route import route_by_model
from .run import Run
from .settings import (
    MIN_STEP_TOKENS,
    OutputGrammar,
    PipelineCancelled,
    PipelineConfig,
    sequential_reason,
)
from .steps import step_budget

__all__ = [
    "answer",
    "iter_answer",
]


def _output_constraint(run: Run, grammar: OutputGrammar) -> Any:
    """The constraint of an output grammar, stopping on the model's own stop tokens."""
    return run.backend.grammar(
        ebnf=grammar.ebnf, json_schema=grammar.json_schema, stop_token_ids=run.stop_ids or None
    )


def iter_answer(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    config: PipelineConfig,
    *,
    cancel: threading.Event | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Generator[Event, None, AnswerResult]:
    """Answer ``messages``; yield events as text is produced; return the merged answer.

    Raises:
        ValueError: bad messages (no question, see ``check_question``), a tokenizer without
            chat template, or a prompt longer than the model's context window.
        PipelineCancelled: ``cancel`` was set (checked before every forward pass).
    """
    check_question(messages)
    run = Run(model, tokenizer, messages, config, cancel, tools)
    t0 = time.perf_counter()
    try:
        result = yield from _dispatch(run, t0)
    except Cancelled as e:
        raise PipelineCancelled(str(e)) from e
    route = {
        "route": run.route,
        "route_reason": run.route_reason,
        "titles": run.titles,
        "step_kind": run.step_kind if result.report.mode_used != "sequential" else None,
    }
    return replace(result, report=result.report.model_copy(update=route))


def _dispatch(run: Run, t0: float) -> Generator:
    config = run.cfg
    if config.mode == "sequential":
        return (yield from _sequential(run, None, 0, t0))
    reason = sequential_reason(config)
    if reason is not None:
        return (yield from _sequential(run, reason, 0, t0))
    if config.mode == "auto" and config.steps is None and not (yield from route_by_model(run)):
        return (yield from _sequential(run, None, 0, t0))  # the model chose a direct answer
    return (yield from _parallel(run, t0))


def _sequential(run: Run, reason: str | None, attempts: int, t0: float) -> Generator:
    """Plain decoding of the whole answer from the caller's messages (also the fallback)."""
    if reason is not None:
        yield FallbackEvent(reason)
    cfg = run.cfg
    template_kw = {"tools": run.tools} if run.tools else {}
    prompt = render_prompt(
        run.tok, run.messages, parse_special_tokens=cfg.parse_special_tokens, **template_kw
    )
    # An output grammar: its forced prefix is prefilled with the prompt, the rest decoded
    # under the grammar, with no stop strings (one inside a JSON string would cut it).
    grammar = cfg.grammar
    # The prefix is the template's tool-call opener: its control tokens stay tokens.
    forced = grammar.prefix if grammar is not None else ""
    forced = run.tok.encode(forced, add_special_tokens=False) if forced else []
    constraint = _output_constraint(run, grammar) if grammar is not None else None
    stops = () if grammar is not None else cfg.stop
    prompt = [*prompt, *forced]
    run.check_prompt(prompt)
    run.input_tokens = run.input_tokens or len(prompt)
    # A fallback answer gets what the plan attempts left of max_tokens (at least half of it).
    budget = max(1, min(cfg.max_tokens - run.output_tokens, run.ctx - len(prompt)))
    cache = run.backend.new_cache()
    stream = TextStream(run.tok, stops, lstrip=not forced)
    t = time.perf_counter()
    if grammar is not None and grammar.prefix:
        yield ContentDelta(grammar.prefix)
    gen = run.backend.iter_decode(
        prompt,
        cache,
        start=0,
        max_new_tokens=budget,
        params=run.params,
        seed=cfg.seed,
        stop_token_ids=run.stop_ids,
        stop_strings=stops,
        tokenizer=run.tok,
        constraint=constraint,
        cancel=run.cancel,
        jump_forward=constraint is not None,  # JSON keys and tool names: one pass each
        # Grammar-bound output (JSON) is bounded by its grammar; free text gets the guard.
        repetition=None if grammar is not None else run.repetition,
        context_ids=prompt,
        loop_guard=grammar is None,
    )
    result = yield from stream_content(gen, stream)
    if tail := stream.finish():
        yield ContentDelta(tail)
    text = stream.text
    if grammar is not None:
        suffix = grammar.suffix if constraint.is_completed() else ""
        if suffix:
            yield ContentDelta(suffix)
        text = grammar.prefix + text + suffix
    run.output_tokens += len(result.token_ids)
    finish_reason = result.finish_reason
    if finish_reason == "repetition":
        run.notes.append("the answer began to repeat itself; the repetition guard ended it")
        finish_reason = "stop"
    run.timings["sequential"] = time.perf_counter() - t
    run.timings["total"] = time.perf_counter() - t0
    report = ParallelReport(
        mode_used="sequential",
        fallback_reason=reason,
        plan_attempts=attempts,
        timings=run.timings,
        notes=run.notes,
    )
    return AnswerResult(text, report, run.input_tokens, run.output_tokens, finish_reason)


def _parallel(run: Run, t0: float) -> Generator:
    cfg = run.cfg
    tok = run.tok
    # The Stage-1 prompt's worked example must not leak into the steps or the conclusion:
    # its topic words are banned there unless the caller's own text uses them.
    run.repetition = run.repetition.banning(echo_words(*run.own_texts()), tok)
    messages = with_system(run.messages, stage1_system_prompt(cfg.max_branches))
    template_kw = {"tools": run.tools} if run.tools else {}
    prompt = render_prompt(
        tok, messages, parse_special_tokens=cfg.parse_special_tokens, **template_kw
    )
    if len(prompt) + MIN_STEP_TOKENS > run.ctx:
        # The Stage-1 instructions make the prompt longer than the caller's messages alone:
        # answer those sequentially (which raises if even they do not fit).
        reason = (
            f"the planning prompt ({len(prompt)} tokens) leaves no room in the context window "
            f"({run.ctx} tokens)"
        )
        return (yield from _sequential(run, reason, 0, t0))
    run.input_tokens = len(prompt)
    cache = run.backend.new_cache()

    # Stage 1: the plan, decoded after the prompt in the same cache (or given by the caller).
    t = time.perf_counter()
    attempts = 0
    try:
        if cfg.steps is not None:
            plan = Plan.model_validate(
                {"preamble": "", "titles": list(cfg.steps)},
                context={"max_branches": cfg.max_branches, "max_title_chars": 200},
            )
            plan_ids = run.encode(format_plan(plan))
        else:
            plan, plan_ids, attempts = run.plan(prompt, cache)
    except (PlanFormatError, ValueError) as e:
        if cfg.steps is not None:
            raise ValueError(f"steps= is not a usable plan: {e}") from e
        run.timings["plan"] = time.perf_counter() - t
        attempts = run.plan_attempts
        reason = f"plan did not validate after {attempts} attempt(s): {e}"
        return (yield from _sequential(run, reason, attempts, t0))
    run.timings["plan"] = time.perf_counter() - t
    # The preamble's length is bounded by the grammar, so it can stop mid-sentence: show its
    # complete sentences only (the plan text in the cache is unchanged).
    plan = plan.model_copy(update={"preamble": whole_sentences(plan.preamble)})
    yield PlanEvent(list(plan.titles), plan.preamble)

    # Budgets: the steps and the conclusion must fit both max_tokens and the context window,
    # since Stage 3 lays the steps out one after another.
    n = len(plan.titles)
    prefix = [*prompt, *plan_ids, *run.encode("\n")]
    per_step, left_tokens, left_ctx = step_budget(run, plan.titles, prefix)
    if per_step < MIN_STEP_TOKENS:
        reason = (
            f"budget too small for {n} parallel steps: each needs {MIN_STEP_TOKENS} tokens, and "
            f"{left_tokens} of max_tokens={cfg.max_tokens} and {left_ctx} of the context "
            f"window ({run.ctx}) are left; raise max_tokens or lower max_branches"
        )
        return (yield from _sequential(run, reason, attempts, t0))

    try:
        return (yield from run_blocks(run, plan, prompt, prefix, cache, per_step, attempts, t0))
    except Cancelled:
        raise
    except Exception as e:
        reason = f"parallel decoding failed ({type(e).__name__}: {e})"
        if isinstance(e, torch.OutOfMemoryError) and run.device.type == "cuda":
            torch.cuda.empty_cache()
        return (yield from _sequential(run, reason, attempts, t0))


def answer(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    config: PipelineConfig | None = None,
    **kwargs: Any,
) -> AnswerResult:
    """Run ``iter_answer`` to the end and return the merged answer."""
    return drive(iter_answer(model, tokenizer, messages, config or PipelineConfig(), **kwargs), [])
