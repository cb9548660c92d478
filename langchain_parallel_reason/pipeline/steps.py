"""Stage 2 and 3: the parallel steps (one branch each over the shared prefix, or stepped: one
after another) and the conclusion after the merged steps.

Contract: each function is a generator over one ``Run`` that yields ``StepDelta`` /
``ContentDelta`` / ``StageEvent`` items and returns an ``AnswerResult``; it raises on a failure
of the parallel path (the caller falls back to sequential decoding).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..decoding.repetition import trim_loop
from ..decoding.sequential import Cancelled, SuppressFirst
from ..decoding.stops import cut_at_stop
from ..prompts import (
    STEP_MARKER,
    conclusion_cue,
    step_header,
)
from ..schemas import ParallelReport
from .events import (
    AnswerResult,
    BlockEnd,
    ContentDelta,
    StepDelta,
    StepsDoneEvent,
    StepsRetryEvent,
    TextStream,
    first_timed,
    stream_content,
)
from .render import (
    marker_token_ids,
    merged_steps_text,
    newline_token_ids,
    record_quote,
    record_rest,
    record_titles,
    step_opening_banned_ids,
    step_token_budget,
    steps_content,
    title_opening_ids,
)
from .run import Run
from .settings import CHECK_SLACK_TOKENS, MIN_CONCLUSION_TOKENS, MIN_STEP_TOKENS

__all__ = [
    "step_budget",
    "stepped_steps_and_conclusion",
    "steps_and_conclusion",
]


def step_budget(run: Run, titles: Sequence[str], prefix: list[int]) -> tuple[int, int, int]:
    """(new tokens per step, tokens left of max_tokens, context left) for a block's steps."""
    # Stage 2 puts each step after its header, and Stage 3 lays all headers and steps out in a
    # row before the cue: count their tokens (a long or non-Latin title takes hundreds), plus
    # a margin, as the steps' text can re-tokenize a little longer than it was decoded.
    n = len(titles)
    layout = sum(len(run.encode(f"{step_header(title)} \n")) for title in titles)
    layout += len(run.encode(conclusion_cue())) + 8 * (n + 1)
    left_tokens = max(0, run.cfg.max_tokens - run.output_tokens)
    left_ctx = max(0, run.ctx - len(prefix) - layout)
    per_step = step_token_budget(n, run.cfg.step_max_tokens, left_tokens, left_ctx)
    return per_step, left_tokens, left_ctx


@dataclass(frozen=True)
class StepForm:
    """How a block's steps open and end (see `step_form`)."""

    headers: list[str]
    """Each step's header, ``####Title:``."""
    quotes: list[str]
    """What each step is forced to write after its header ("" for a paragraph step)."""
    stops: tuple[str, ...]
    """Stop strings of every step."""
    opening_ban: list[int]
    """Ids no step may open with (besides EOS), for its first tokens."""
    title_openings: list[list[int]]
    """Per step, the first tokens of the other titles: not its first token."""
    caps: tuple[int, ...] = ()
    """Per check step, most tokens its check may write: its record's rest of line, in
    tokens, plus ``CHECK_SLACK_TOKENS`` (empty for paragraph steps)."""

    def budget(self, per_step: int, b: int) -> int:
        """New tokens for step b: ``per_step``, or less for a check whose record is short."""
        return max(1, min(per_step, self.caps[b])) if self.caps else per_step

    @property
    def check(self) -> bool:
        """Check steps (they open with a quote): a stop may end one at once only where its
        record's line ends at the title (``title_openings`` bans it otherwise)."""
        return any(self.quotes)

    def opening_tokens(self, per_step: int) -> int:
        """How many first tokens the opening bans (and EOS) hold for."""
        return 0 if self.check else min(MIN_STEP_TOKENS, per_step // 2)

    @property
    def heads(self) -> list[str]:
        """Header and quote of each step: the text it is forced to open with."""
        return [h + q for h, q in zip(self.headers, self.quotes, strict=True)]


def step_form(run: Run, titles: Sequence[str]) -> StepForm:
    """How a block's steps open and end.

    A paragraph step is forced to open with its header (``####Title:``), may not open with a
    marker, the placeholder or another title, and ends at the next step marker or a caller's
    stop. When every title is a record of the user's material (``record_titles``: "Oscar
    Popescu" in "1. Name: Oscar Popescu; GPA: 3.81"), each step is a check of its item: its
    header is followed by the record's own opening up to the title ("Name: Oscar Popescu",
    ``record_quote``), so the model reads on from that record (a small model copies well and
    guesses badly), and it ends at the line's end: one line per item. ``run.step_kind``
    records which.
    """
    question = run.question()
    check = record_titles(question, titles)
    run.step_kind = run.step_kind or ("check" if check else "paragraph")
    headers = [step_header(title) for title in titles]
    if check:
        quotes = [f" {record_quote(question, title)}" for title in titles]
        rests = [record_rest(question, title) for title in titles]  # "; GPA: 3.81; ..."
        # A record that goes on after its title is copied on: the step's first token may not
        # end it (the 135M model ended 7 of 72 retrieval checks at once, checking nothing).
        ends = [*newline_token_ids(run.tok), *run.stop_ids]
        openings = [ends if rest.strip() else [] for rest in rests]
        # A check copies the rest of its record's line; one that runs far past it is no
        # longer checking ("Nikhil Costa, GPA: 3.97, Major: Art, GPA: 3.96, Major: ..."),
        # and in parallel the longest step holds Stage 2 up.
        caps = tuple(len(run.encode(rest)) + CHECK_SLACK_TOKENS for rest in rests)
        stops = (STEP_MARKER, *run.cfg.stop, "\n")
        return StepForm(headers, quotes, stops, [], openings, caps)
    return StepForm(
        headers,
        [""] * len(titles),
        (STEP_MARKER, *run.cfg.stop),
        step_opening_banned_ids(run.tok),
        title_opening_ids(run.tok, titles),
    )


def steps_and_conclusion(run, plan, prompt, prefix, cache, per_step, attempts, t0):
    tok = run.tok
    n = len(plan.titles)
    # Bring the cache to exactly the prefix: Stage 1 left prompt + plan minus its last token.
    have = cache.get_seq_length()
    t = time.perf_counter()
    prefix_logits = run.backend.forward_tokens(prefix[have:], cache, have)
    form = step_form(run, plan.titles)
    headers, quotes, step_stops = form.headers, form.quotes, form.stops
    branch_prefixes = [run.encode(head) for head in form.heads]
    streams = [TextStream(tok, step_stops, lstrip=not q) for q in quotes]
    for b, quote in enumerate(quotes):
        if quote:  # a check step's text opens with its quote
            yield StepDelta(b, plan.titles[b], quote.strip())
    # The preamble opens the content, but is sent with the steps: a failure in Stage 2 falls
    # back to sequential decoding, and content already sent could not be taken back.
    preamble = plan.preamble.strip()
    stage2 = (prefix, branch_prefixes, per_step, cache, prefix_logits)
    out = yield from _decode_steps(run, plan.titles, *stage2, streams, form, _reuse_requested(run))
    for b in range(n):
        if tail := streams[b].finish():
            yield StepDelta(b, plan.titles[b], tail)
    run.timings["steps"] = time.perf_counter() - t
    bodies = [
        _body(tok, s, r, step_stops, q)
        for q, s, r in zip(quotes, streams, out.branches, strict=True)
    ]
    branch_tokens = [len(r.token_ids) for r in out.branches]
    if out.width < n:
        run.notes.append(f"out of memory: steps decoded {out.width} at a time")
    run.output_tokens += sum(branch_tokens)
    yield StepsDoneEvent(branch_tokens, [b.strip() for b in bodies])

    # Stage 3: the steps laid out in plan order, as if written one after another, then the
    # conclusion. The prefix cache is reused; the merged steps are prefilled, or with
    # conclusion_kv="reuse" their own KV from Stage 2 is laid out in a row (decoding.merge).
    t = time.perf_counter()
    steps_md = steps_content(preamble, plan.titles, bodies)
    yield ContentDelta(steps_md)
    laid = (
        _reuse_steps_kv(run, prefix, cache, branch_prefixes, out, step_stops)
        if out.branch_kv
        else None
    )
    if laid is None:
        stage3 = run.encode(merged_steps_text(headers, bodies) + conclusion_cue())
        start, logits, context = len(prefix), None, prefix
    else:  # the cache holds the steps and the cue already
        stage3 = []
        start, logits, context = laid
    picks = plan.titles if form.check else ()
    conclusion, conclusion_tokens, finish_reason = yield from _conclusion(
        run, cache, stage3, start, context, t, logits=logits, picks=picks, titles=plan.titles
    )
    run.timings["total"] = time.perf_counter() - t0
    content = steps_md + conclusion
    report = ParallelReport(
        mode_used="parallel",
        steps=list(plan.titles),
        branch_tokens=branch_tokens,
        branch_finish_reasons=[r.finish_reason for r in out.branches],
        decode_steps=out.forward_passes,
        tokens_per_forward=(out.tokens / out.forward_passes) if out.forward_passes else None,
        plan_attempts=attempts,
        conclusion_tokens=conclusion_tokens,
        conclusion_kv="reprefill" if laid is None else "reuse",
        timings=run.timings,
        attention=out.attention,
        notes=run.notes,
    )
    return AnswerResult(content, report, run.input_tokens, run.output_tokens, finish_reason)


def stepped_steps_and_conclusion(run, plan, prompt, prefix, cache, per_step, attempts, t0):
    """Mode "stepped", the paper's baseline: the plan's steps written one after another in ONE
    sequence by ordinary decoding (step b sees the earlier ones), then the same conclusion.

    Each step gets what a parallel branch gets: its header forced, the same budget, seed + b,
    stop strings, opening bans (``step_opening_banned_ids`` and EOS for its first tokens, the
    other titles' first tokens as its first token), repetition controls and loop guard. The
    cache holds the sequence as text would lay it out: each step's tokens up to its stop
    marker (the marker's tokens are cropped), a newline, the next header, ... the cue.
    """
    cfg, tok = run.cfg, run.tok
    n = len(plan.titles)
    t = time.perf_counter()
    form = step_form(run, plan.titles)
    quotes, step_stops, heads = form.quotes, form.stops, form.heads
    opening = form.title_openings
    banned = [*form.opening_ban, *run.stop_ids]
    # Stage 1 left prompt + plan minus its last token in the cache (nothing with steps=).
    pos = cache.get_seq_length()
    row = list(prefix[:pos])  # the sequence the cache holds, in order
    feed = [*prefix[pos:], *run.encode(heads[0])]
    results, bodies = [], []
    for b, title in enumerate(plan.titles):
        stream = TextStream(tok, step_stops, lstrip=not quotes[b])
        if quotes[b]:
            yield StepDelta(b, title, quotes[b].strip())
        gen = run.backend.iter_decode(
            feed,
            cache,
            start=pos,
            max_new_tokens=form.budget(per_step, b),
            params=run.params,
            seed=None if cfg.seed is None else cfg.seed + b,
            stop_token_ids=run.stop_ids,
            stop_strings=step_stops,
            tokenizer=tok,
            suppress=SuppressFirst(banned, form.opening_tokens(per_step), opening[b]),
            cancel=run.cancel,
            repetition=run.repetition,
            context_ids=row,
            loop_guard=True,
        )
        while True:
            try:
                token = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            if delta := stream.push(token):
                yield StepDelta(b, title, delta)
        if tail := stream.finish():
            yield StepDelta(b, title, tail)
        results.append(result)
        bodies.append(_body(tok, stream, result, step_stops, quotes[b]))
        # Keep the step's tokens that spell its text; the rest of the text, a newline and the
        # next header (or the cue) are fed with the next step.
        keep, text = _kept_tokens(tok, result, step_stops)
        row += [*feed, *result.token_ids[:keep]]
        pos = len(row)
        run.backend.crop(cache, pos)
        glue = _glue(tok, result.token_ids, keep, text)
        feed = run.encode(glue + (heads[b + 1] if b + 1 < n else conclusion_cue()))
    run.timings["steps"] = time.perf_counter() - t
    branch_tokens = [len(r.token_ids) for r in results]
    run.output_tokens += sum(branch_tokens)
    yield StepsDoneEvent(branch_tokens, [b.strip() for b in bodies])

    t = time.perf_counter()
    steps_md = steps_content(plan.preamble.strip(), plan.titles, bodies)
    yield ContentDelta(steps_md)
    picks = plan.titles if form.check else ()
    conclusion, conclusion_tokens, finish_reason = yield from _conclusion(
        run, cache, feed, pos, row, t, picks=picks, titles=plan.titles
    )
    run.timings["total"] = time.perf_counter() - t0
    report = ParallelReport(
        mode_used="stepped",
        steps=list(plan.titles),
        branch_tokens=branch_tokens,
        branch_finish_reasons=[r.finish_reason for r in results],
        decode_steps=sum(branch_tokens),
        tokens_per_forward=1.0 if sum(branch_tokens) else None,
        plan_attempts=attempts,
        conclusion_tokens=conclusion_tokens,
        timings=run.timings,
        notes=run.notes,
    )
    content = steps_md + conclusion
    return AnswerResult(content, report, run.input_tokens, run.output_tokens, finish_reason)


def pick_grammar(picks: Sequence[str]) -> str:
    """EBNF of a conclusion after check steps: one of ``picks`` (the checked items, as the
    message writes them), and nothing else; the pipeline then quotes the picked item's record
    (`picked_record`). The 135M model's free conclusions after record checks mostly named
    nobody ("The student with the lowest GPA is the student with the lowest GPA."), so it must
    pick among the items it checked; what it wrote after the pick was either the Stage-1
    example's conclusion with the item put in ("Viktor Andersen is the better student here,
    since the student's full name is Emil Okafor.": 20-25 tokens naming a second item) or a
    copy of the picked record, now and then looping or cut ("Document 1: Daria Tanaka, Daria
    Tanaka, Daria Tan")."""
    alternatives = " | ".join(json.dumps(p, ensure_ascii=False) for p in dict.fromkeys(picks))
    return f"root ::= {alternatives}\n"


def picked_record(question: str, picks: Sequence[str], written: str) -> str:
    """What follows the pick in a conclusion after check steps: the rest of the picked item's
    record line as the message writes it ("; GPA: 3.81; Major: Biology", ": The Amber Tower
    ... was designed by ..."), or "." where the record ends at its title; "" when ``written``
    is none of ``picks``. The model's decision is the pick; the record it picked shows why."""
    chosen = written.strip()
    if chosen not in picks:
        return ""
    return record_rest(question, chosen).rstrip() or "."


def conclusion_stops(stop: Sequence[str], titles: Sequence[str]) -> tuple[str, ...]:
    """The conclusion's stop strings: the caller's, the step marker (a later block opens with
    it), and each step's header written with three ``#`` (``###Books:``): the 135M model
    sometimes rewrites the steps after its conclusion that way, which the four-``#`` marker
    does not catch. A four-``#`` header still stops at the marker first (it is complete a
    token earlier)."""
    return (*stop, STEP_MARKER, *(f"###{title}:" for title in titles))


def _conclusion(run, cache, feed, start, context, t, logits=None, picks=(), titles=()):
    """Stage 3's decoding: ``feed`` (the token ids the cache still lacks, ending with the
    conclusion cue) at position ``start``, then the conclusion; yields its ContentDelta items
    and returns ``(text, decoded tokens, finish_reason)``. ``context`` is the sequence before
    ``feed`` (for the repetition controls); ``t`` is when Stage 3 began; ``logits``: those
    after the cue when the cache holds it already (``feed`` is then empty). ``picks``: after check steps,
    the conclusion is one of them (a grammar; `pick_grammar`), then the picked item's record
    is quoted (`picked_record`; content, not decoded).
    ``titles``: the steps' titles (`conclusion_stops`).

    The steps are content already, so nothing here falls back: when the context is full (the
    merged steps can re-tokenize longer than decoded) or the conclusion fails, the answer ends
    after the steps, finish_reason "length", with a note. Sets ``timings["merge"]`` (Stage 3
    until the first conclusion token: the steps laid out in the cache, the cue prefilled) and
    ``timings["conclusion"]`` (all of Stage 3).
    """
    cfg, tok = run.cfg, run.tok
    room = run.ctx - start - len(feed)
    budget = min(cfg.max_tokens - run.output_tokens, room)
    stops = conclusion_stops(cfg.stop, titles)
    stream = TextStream(tok, stops, lstrip=True)
    finish_reason = "length"
    if room < 1:
        run.notes.append(f"context window ({run.ctx} tokens) full after the steps: no conclusion")
    elif budget < 1:
        run.notes.append(
            f"no conclusion: the plan and the steps used all of max_tokens={cfg.max_tokens}"
        )
    else:
        gen3 = run.backend.iter_decode(
            feed,
            cache,
            start=start,
            max_new_tokens=budget,
            params=run.params,
            seed=cfg.seed,
            stop_token_ids=run.stop_ids,
            stop_strings=stops,
            tokenizer=tok,
            cancel=run.cancel,
            # Right after the steps a small model tends to end the answer at once (EOS) or
            # start another step: neither may come before a few words of conclusion.
            # A pick's grammar opens with an item and ends with it: nothing to hold off.
            suppress=SuppressFirst(
                [*run.stop_ids, *marker_token_ids(tok)],
                0 if picks else min(MIN_CONCLUSION_TOKENS, budget),
            ),
            repetition=run.repetition,
            context_ids=context,
            loop_guard=True,
            logits=logits,
            constraint=run.backend.grammar(ebnf=pick_grammar(picks), stop_token_ids=run.stop_ids)
            if picks
            else None,
        )
        try:
            timed = first_timed(gen3, run.timings, "merge", t)
            out3 = yield from stream_content(timed, stream)
            run.block_end = BlockEnd([*context, *feed], stream.tokens, out3.stop)
            finish_reason = out3.finish_reason
            if finish_reason == "repetition":
                run.notes.append("the conclusion began to repeat itself; the guard ended it")
                finish_reason = "stop"
        except Cancelled:
            raise
        except Exception as e:
            run.notes.append(f"conclusion failed ({type(e).__name__}: {e}); answer ends there")
        if tail := stream.finish():
            yield ContentDelta(tail)
    text = stream.text
    if picks and (quote := picked_record(run.question(), picks, text)):
        yield ContentDelta(quote)
        text += quote
    run.output_tokens += len(stream.tokens)
    if budget >= 1 and room >= 1 and not stream.text.strip():
        run.notes.append("the conclusion came out empty")
    run.timings["conclusion"] = time.perf_counter() - t
    return text, len(stream.tokens), finish_reason


def _kept_tokens(tok: Any, result: Any, stops: Sequence[str]) -> tuple[int, str]:
    """(k, text): how many of a step's first tokens stay in the cache, and the step's text as
    it stands in the row (its stop string cut; after the loop guard, one copy of the loop).

    The first k tokens spell a prefix of that text; the last sampled token is never in the
    cache, and the tokens that spell the stop marker must leave it, so k < len(tokens).
    """
    tokens = result.token_ids
    written = trim_loop(tokens) if result.finish_reason == "repetition" else tokens
    text = cut_at_stop(tok.decode(written, skip_special_tokens=True), stops)[0]
    for k in range(min(len(written), len(tokens) - 1), 0, -1):
        spelled = tok.decode(tokens[:k], skip_special_tokens=True)
        if text.startswith(spelled) and not spelled.endswith("\ufffd"):
            return k, text
    return 0, text


def _glue(tok: Any, tokens: list[int], keep: int, text: str) -> str:
    """The text that follows a step's kept tokens in the row: what of ``text`` they do not
    spell, then a newline (unless the step ended with one), as ``merged_steps_text`` lays out."""
    rest = text[len(tok.decode(tokens[:keep], skip_special_tokens=True)) :]
    return rest if text.endswith("\n") else rest + "\n"


def _reuse_requested(run: Run) -> bool:
    """Whether Stage 2 keeps the steps' KV for Stage 3 (a note says why not when asked)."""
    if run.cfg.conclusion_kv != "reuse":
        return False
    problem = run.backend.kv_reuse_problem()
    if problem is not None:
        run.notes.append(f"conclusion_kv='reuse' unavailable ({problem}): steps re-prefilled")
    return problem is None


def _reuse_steps_kv(run, prefix, cache, branch_prefixes, out, stops):
    """Lay the steps' own KV and the cue out after the prefix (``decoding.merge``); returns
    (the row's length, the logits after the cue, the row), or None after a failure (noted;
    the cache holds the prefix again and the steps are re-prefilled)."""
    tok = run.tok
    kvs, kept, glues = [], [], []
    for forced, result, kv in zip(branch_prefixes, out.branches, out.branch_kv, strict=True):
        keep, text = _kept_tokens(tok, result, stops)
        length = len(forced) + keep
        kvs.append([(k[..., :length, :], v[..., :length, :]) for k, v in kv])
        kept.append([*forced, *result.token_ids[:keep]])
        glues.append(_glue(tok, result.token_ids, keep, text))
    glues[-1] += conclusion_cue()
    glue_ids = [run.encode(g) for g in glues]
    try:
        end, logits = run.backend.lay_out_branches(cache, kvs, glue_ids, run.cancel)
    except Cancelled:
        raise
    except Exception as e:
        run.backend.crop(cache, len(prefix))
        run.notes.append(f"conclusion_kv='reuse' failed ({type(e).__name__}: {e}): re-prefilled")
        return None
    row = list(prefix)  # in position order: each step's kept tokens, then its glue
    for ids, glue in zip(kept, glue_ids, strict=True):
        row += [*ids, *glue]
    return end, logits, row


def _body(tok: Any, stream: TextStream, result: Any, stops: Sequence[str], quote: str = "") -> str:
    """A step's text for the content: its quote, then what was streamed, or, when the loop
    guard ended the step, its tokens up to the first copy of the repeated unit. After a quote
    the text keeps its leading space (it goes on from the quote)."""
    lstrip = not quote
    if result.finish_reason != "repetition":
        text = stream.text
    else:
        kept = TextStream(tok, stops, lstrip=lstrip)
        for token in trim_loop(result.token_ids):
            kept.push(token)
        kept.finish()
        text = kept.text
    return text.strip() if lstrip else quote.strip() + text.rstrip()


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


@dataclass(frozen=True)
class _StepsOutput:
    branches: list[Any]
    forward_passes: int
    tokens: int
    attention: str
    width: int
    branch_kv: list[Any] | None = None  # with keep_kv: each step's KV (decoder.BranchesOutput)


def _decode_steps(
    run,
    titles,
    prefix,
    branch_prefixes,
    per_step,
    cache,
    prefix_logits,
    streams,
    form,
    keep_kv=False,
):
    """Stage 2, with a memory fallback: on out-of-memory, decode the branches in halves.

    Branches are independent and branch b always samples with seed + b, so decoding them in
    groups gives exactly the same steps as decoding them all at once; only speed changes.
    ``keep_kv`` keeps each step's KV for a Stage 3 that reuses it.
    """
    cfg = run.cfg
    n = len(branch_prefixes)
    width = n
    results: list[Any] = [None] * n
    kvs: list[Any] = [None] * n
    forwards = tokens = 0
    attention = "split"
    start = 0
    while start < n:
        group = list(range(start, min(n, start + width)))
        gen = run.backend.iter_decode_branches(
            prefix,
            [branch_prefixes[i] for i in group],
            max_new_tokens=[form.budget(per_step, i) for i in group],
            params=run.params,
            seed=None if cfg.seed is None else cfg.seed + group[0],
            stop_token_ids=run.stop_ids,
            stop_strings=form.stops,
            tokenizer=run.tok,
            prefix_cache=cache,
            prefix_logits=prefix_logits,
            attention=cfg.attention,
            cancel=run.cancel,
            # Right after the plan's title list a small model tends to start the next title at
            # once ("\n####...") or copy the placeholder: a step may not open with those.
            suppress=SuppressFirst(
                [*run.stop_ids, *form.opening_ban], form.opening_tokens(per_step)
            ),
            # ... nor restate another step's title; every step runs under the loop guard.
            opening_banned_ids=[form.title_openings[i] for i in group],
            repetition=run.repetition,
            loop_guard=True,
            keep_kv=keep_kv,
        )
        try:
            while True:
                try:
                    event = next(gen)
                except StopIteration as stop:
                    out = stop.value
                    break
                for j, token in zip(event.branch_ids, event.token_ids, strict=True):
                    b = group[j]
                    if delta := streams[b].push(token):
                        yield StepDelta(b, titles[b], delta)
        except Exception as e:
            if not _is_oom(e) or width == 1:
                raise
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
            width = max(1, width // 2)
            for b in group:  # their partial text is decoded again
                streams[b].reset()
            yield StepsRetryEvent("out of memory", width)
            continue
        for j, result in enumerate(out.branches):
            results[group[j]] = result
            if keep_kv:
                kvs[group[j]] = out.branch_kv[j]
        forwards += out.forward_passes
        tokens += out.tokens
        attention = out.attention
        start += len(group)
    return _StepsOutput(results, forwards, tokens, attention, width, kvs if keep_kv else None)
