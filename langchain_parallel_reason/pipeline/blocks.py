"""Later blocks: after a conclusion that writes a step marker, the model plans and answers
another block in the same cache, up to ``max_blocks``.

Contract: ``run_blocks`` yields the events of every block, step numbers continuing, and returns
one ``AnswerResult`` whose report lists each block (``block_report``); a block that fails ends the
answer after the blocks before it.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import replace

from transformers.cache_utils import DynamicCache

from ..decoding.sequential import Cancelled
from ..decoding.stops import cut_at_stop
from ..plan import PlanFormatError, format_plan
from ..prompts import (
    STEP_MARKER,
)
from ..schemas import ParallelReport
from .events import AnswerResult, ContentDelta, PlanEvent, StepDelta
from .render import block_report
from .run import Run
from .settings import MIN_PLAN_TOKENS, MIN_STEP_TOKENS
from .steps import step_budget, stepped_steps_and_conclusion, steps_and_conclusion

__all__ = [
    "run_blocks",
]


def run_blocks(run, plan, prompt, prefix, cache, per_step, attempts, t0):
    """The first block's steps and conclusion, then each block the model opens by writing a
    step marker in a conclusion, up to ``max_blocks``; returns the whole answer.

    Once the first block's steps are content nothing falls back: a later block that cannot
    run (its plan fails, no budget, an error) ends the answer after the blocks before it,
    with a note. A later block's step numbers (``StepDelta.step``) go on from the earlier
    ones, so they index the report's concatenated ``steps``.
    """
    results: list[AnswerResult] = []
    offset = 0
    sep = ""
    steps = stepped_steps_and_conclusion if run.cfg.mode == "stepped" else steps_and_conclusion
    while True:
        run.block_end = None
        gen = steps(run, plan, prompt, prefix, cache, per_step, attempts, t0)
        try:
            results.append((yield from _renumbered(gen, offset, sep)))
        except Cancelled:
            raise
        except Exception as e:
            if not results:
                raise  # the first block: _parallel falls back to sequential decoding
            run.notes.append(
                f"block {len(results) + 1} failed ({type(e).__name__}: {e}); the answer ends "
                f"after block {len(results)}"
            )
            break
        offset += len(plan.titles)
        text = "".join(r.content for r in results)
        sep = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        if len(results) >= run.cfg.max_blocks:
            break
        earlier = {t.casefold() for r in results for t in r.report.steps}
        opened = yield from _next_block(run, cache, len(results) + 1, earlier)
        if opened is None:
            break
        plan, prefix, per_step, attempts = opened
    return _merged_blocks(run, results, t0)


def _renumbered(gen: Generator, offset: int, sep: str) -> Generator:
    """``gen``'s events with step numbers moved by ``offset`` and ``sep`` before its first
    content; returns ``gen``'s result with ``sep`` before its content."""
    pending = sep  # sent with the first content
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            result = stop.value
            return replace(result, content=sep + result.content) if sep else result
        if isinstance(event, StepDelta) and offset:
            event = StepDelta(event.step + offset, event.title, event.text)
        elif isinstance(event, ContentDelta) and pending:
            event, pending = ContentDelta(pending + event.text), ""
        yield event


def _next_block(run: Run, cache: DynamicCache, number: int, earlier: set[str]) -> Generator:
    """The plan of block ``number`` when the last conclusion stopped at a step marker (the
    model opened a block): (plan, prefix, tokens per step, plan attempts), or None.

    Titles of ``earlier`` blocks (casefolded) are dropped from the plan, and the block is not
    run when fewer than 2 remain: SmolLM2-135M's second block mostly restated the first's
    titles in another order (README, "Several blocks").
    """
    end = run.block_end
    if end is None or end.stop != STEP_MARKER:
        return None
    cfg = run.cfg
    # The conclusion up to the marker, then the block's title lines from a new line.
    text = cut_at_stop(run.tok.decode(end.conclusion_ids, skip_special_tokens=True), (STEP_MARKER,))
    context = [*end.context, *run.encode(text[0].rstrip() + "\n")]
    left = min(cfg.max_tokens - run.output_tokens, run.ctx - len(context))
    if left < MIN_PLAN_TOKENS + 3 * MIN_STEP_TOKENS:  # a plan of 2 titles, 2 steps, a conclusion
        run.notes.append(
            f"the model opened block {number}, but only {max(left, 0)} tokens of max_tokens="
            f"{cfg.max_tokens} and the context window were left: the answer ends there"
        )
        return None
    t = time.perf_counter()
    run.backend.crop(cache, len(end.context))  # the conclusion's tokens make way for its text
    rest = context[len(end.context) : -1]
    if rest:
        run.backend.forward_tokens(rest, cache, len(end.context))
    try:
        plan, plan_ids, attempts = run.plan(context, cache, cap=left // 2, preamble=False)
    except PlanFormatError as e:
        run.notes.append(f"block {number}'s plan did not validate ({e}): the answer ends there")
        return None
    run.timings["plan"] = time.perf_counter() - t
    kept = [title for title in plan.titles if title.casefold() not in earlier]
    if len(kept) < 2:
        run.notes.append(
            f"block {number}'s plan {plan.titles} repeats earlier steps: the answer ends there"
        )
        return None
    if len(kept) < len(plan.titles):  # the cache gets the plan as it is kept
        plan = plan.model_copy(update={"titles": kept})
        plan_ids = run.encode(format_plan(plan))
        run.backend.crop(cache, len(context) - 1)
    yield PlanEvent(list(plan.titles), "", block=number - 1)
    prefix = [*context, *plan_ids, *run.encode("\n")]
    per_step, left_tokens, _ = step_budget(run, plan.titles, prefix)
    if per_step < MIN_STEP_TOKENS:
        run.notes.append(
            f"block {number}'s steps would get {per_step} tokens each ({left_tokens} of "
            f"max_tokens={cfg.max_tokens} left): the answer ends there"
        )
        return None
    return plan, prefix, per_step, attempts


def _merged_blocks(run: Run, results: list[AnswerResult], t0: float) -> AnswerResult:
    """One answer from its blocks: content joined, report totals plus ``blocks``."""
    reports = [r.report for r in results]
    blocks = [block_report(r) for r in reports]
    last = results[-1]
    if len(results) == 1:
        # Notes written after the block's report (why no further block ran) join it here.
        update = {"blocks": blocks, "notes": list(run.notes)}
        return replace(last, report=last.report.model_copy(update=update))
    passes = sum(r.decode_steps for r in reports)
    tokens = sum((r.tokens_per_forward or 0) * r.decode_steps for r in reports)
    timings = dict(reports[-1].timings)
    for stage in ("plan", "steps", "conclusion"):
        timings[stage] = sum(b.timings.get(stage, 0.0) for b in blocks)
    timings["total"] = time.perf_counter() - t0
    report = ParallelReport.model_validate(
        reports[0].model_dump()
        | {
            "steps": [t for r in reports for t in r.steps],
            "branch_tokens": [t for r in reports for t in r.branch_tokens],
            "branch_finish_reasons": [f for r in reports for f in r.branch_finish_reasons],
            "decode_steps": passes,
            "tokens_per_forward": round(tokens) / passes if passes else None,
            "plan_attempts": sum(r.plan_attempts for r in reports),
            "conclusion_tokens": sum(r.conclusion_tokens for r in reports),
            "timings": timings,
            "notes": list(run.notes),
            "blocks": [b.model_dump() for b in blocks],
        }
    )
    content = "".join(r.content for r in results)
    return AnswerResult(content, report, run.input_tokens, run.output_tokens, last.finish_reason)
