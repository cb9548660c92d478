"""The three stages over one KV cache: plan -> parallel steps -> conclusion (no LangChain here).

Contract: ``iter_answer(model, tokenizer, messages, config)`` yields ``ContentDelta`` (the next
piece of the final content, in order), ``StepDelta`` (live text of a parallel step, not content)
and ``StageEvent`` items, and returns an ``AnswerResult``; the ContentDelta texts concatenate to
``AnswerResult.content``. Stage 1 writes the plan after the prompt in the same cache; when it
does not validate it is re-sampled (tenacity; each retry with a derived seed and a higher
temperature, so the same call always gives the same answer), then the answer falls back to
ordinary sequential decoding, and the report says why. Budgets: ``max_tokens`` bounds every
token the call writes, plan attempts included (they may spend at most half of it, so a fallback
keeps the rest). Every step and the conclusion run under a loop guard and the caller's
repetition controls (transformers' ``repetition_penalty`` / ``no_repeat_ngram_size``). Any failure of the parallel path (Stage 2 or 3)
falls back the same way. The caller serialises calls on one model (the chat model holds a lock).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from tenacity import Retrying, retry_if_exception, stop_after_attempt
from transformers.cache_utils import DynamicCache

from .decoding.cache import crop_to
from .decoding.decoder import iter_decode_branches, model_device
from .decoding.repetition import RepetitionControl, trim_loop
from .decoding.sampling import SamplingParams
from .decoding.sequential import Cancelled, SuppressFirst, forward_tokens, iter_decode
from .decoding.stops import cut_at_stop
from .plan import PlanFormatError, format_plan, parse_plan, plan_grammar_ebnf
from .prompts import (
    END_MARKER,
    STEP_MARKER,
    conclusion_cue,
    example_titles,
    route_question,
    stage1_system_prompt,
    step_header,
)
from .schemas import BlockReport, ParallelReport, Plan

__all__ = [
    "AnswerResult",
    "ContentDelta",
    "OutputGrammar",
    "PipelineCancelled",
    "PipelineConfig",
    "StageEvent",
    "StepDelta",
    "TextStream",
    "answer",
    "block_report",
    "check_question",
    "choose_route",
    "forced_route",
    "iter_answer",
    "merged_steps_text",
    "render_prompt",
    "resample_settings",
    "step_token_budget",
    "steps_content",
]

Mode = Literal["auto", "parallel", "sequential", "stepped"]
# Fewest new tokens a parallel step gets before the context/max_tokens budget makes parallel
# decoding pointless; below it the answer is decoded sequentially and the reason recorded.
MIN_STEP_TOKENS = 8
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
            None = off.
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
            before that choice (higher: plan more often).
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
            (self.max_branches >= 2, f"max_branches must be >= 2, got {self.max_branches}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (
                self.step_max_tokens >= 1,
                f"step_max_tokens must be >= 1, got {self.step_max_tokens}",
            ),
            (
                self.plan_max_tokens >= 1,
                f"plan_max_tokens must be >= 1, got {self.plan_max_tokens}",
            ),
            (self.plan_retries >= 0, f"plan_retries must be >= 0, got {self.plan_retries}"),
            (self.max_blocks >= 1, f"max_blocks must be >= 1, got {self.max_blocks}"),
            (
                math.isfinite(self.route_bias),
                f"route_bias must be a finite number, got {self.route_bias}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass(frozen=True)
class ContentDelta:
    """The next piece of the final content, in order."""

    text: str


@dataclass(frozen=True)
class StepDelta:
    """Live text of parallel step ``step`` (0-based) as it is decoded; not part of content."""

    step: int
    title: str
    text: str


@dataclass(frozen=True)
class StageEvent:
    """A stage boundary: "plan" (titles), "steps_done", "fallback" (reason)."""

    stage: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AnswerResult:
    """The merged answer and what happened."""

    content: str
    report: ParallelReport
    input_tokens: int
    output_tokens: int
    finish_reason: Literal["stop", "length"] = "stop"
    """Why the answer ended: EOS or a stop string ("stop"), or its token budget ("length")."""


Event = ContentDelta | StepDelta | StageEvent


class TextStream:
    """Incremental detokenizer that never emits half a character or a possible stop string.

    ``push(token)`` returns the newly final text; text that could still become the start of a
    stop string (or is an incomplete UTF-8 sequence) is held back until ``finish()``, which cuts
    the whole text before the first stop string and returns the remainder.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), *, lstrip: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.lstrip = lstrip
        self.tokens: list[int] = []
        self.emitted = 0

    def _text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return text.lstrip() if self.lstrip else text

    def push(self, token: int) -> str:
        """Add one token; return text that is now final."""
        self.tokens.append(token)
        text = self._text()
        if text.endswith("\ufffd"):
            return ""
        text, hit = cut_at_stop(text, self.stops)
        safe = len(text) if hit else max(self.emitted, len(text) - self.hold)
        delta = text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def reset(self) -> None:
        """Forget every token (the text is being decoded again)."""
        self.tokens.clear()
        self.emitted = 0

    def finish(self) -> str:
        """Return the held-back tail (stop strings cut)."""
        text, _ = cut_at_stop(self._text(), self.stops)
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta

    @property
    def text(self) -> str:
        """Everything final so far after ``finish()``."""
        return cut_at_stop(self._text(), self.stops)[0]


def render_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    parse_special_tokens: bool = False,
    **template_kw: Any,
) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, ready for generation.

    Text in the messages (and tools) that spells a control token, e.g. ``<|im_end|>`` typed
    by a user or returned by a tool, is tokenized as plain text, so it cannot end a turn or
    forge a role; only the template's own control tokens are tokens (transformers'
    ``sanitize_control_tokens``). ``parse_special_tokens=True`` reads such text as the
    tokens instead, as transformers' chat pipelines do by default.
    """
    if not getattr(tokenizer, "chat_template", None):
        msg = "the tokenizer has no chat_template; pass a tokenizer that defines one (tokenizer.chat_template = ...)"
        raise ValueError(msg)
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    def render(**kw: Any) -> Any:
        try:
            return tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, **template_kw, **kw
            )
        except TemplateError as e:
            msg = (
                f"the tokenizer's chat template rejected these messages ({e}); check the roles "
                "and their order (some templates need a user message, or no system message)"
            )
            raise ValueError(msg) from e

    try:
        return list(
            render(
                tokenize=True,
                return_dict=False,
                sanitize_control_tokens=not parse_special_tokens,
            )
        )
    except (TypeError, UnicodeError):
        text = render(tokenize=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: tokenizers raise a bare TypeError
            msg = (
                f"the messages hold {text[e.start : e.end]!r}, which is not valid Unicode text "
                "(a lone surrogate); decode the input with errors='replace' or remove it"
            )
            raise ValueError(msg) from None
        raise
    except ValueError as e:
        if not str(e).startswith("Can't sanitize"):  # transformers' own wording
            raise
        msg = (
            f"{e}: this tokenizer cannot keep that text apart from the control token; remove "
            "it from the messages, or pass parse_special_tokens=True to read it as the token"
        )
        raise ValueError(msg) from e


def check_question(messages: Sequence[dict[str, Any]]) -> None:
    """Raise ValueError unless ``messages`` ask something the answer can respond to.

    The last user or tool message is the question: a user message must hold text (a tool
    result may be empty), and a tool message must follow an assistant message with tool
    calls. Without this, a model answers the planning prompt's example instead.
    """
    if not messages:
        raise ValueError("messages is empty: pass at least one user message")
    called = False
    last = None
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            called = True
        elif role == "tool" and not called:
            msg = (
                f"a tool message (tool_call_id={message.get('tool_call_id')!r}) answers no "
                "earlier tool call: put the AIMessage with that tool call before it, or pass "
                "the text as a user message"
            )
            raise ValueError(msg)
        if role in ("user", "tool"):
            last = message
    if last is None:
        msg = (
            "no question: the messages hold no user message (only system or assistant text); "
            "add a HumanMessage with the question"
        )
        raise ValueError(msg)
    if last["role"] == "user" and not str(last.get("content") or "").strip():
        msg = "the question is empty: the last user message holds no text; ask something"
        raise ValueError(msg)


def with_system(messages: list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    """``messages`` with ``system`` first in one leading system message."""
    # The Stage-1 instruction goes first; a caller's system prompt follows it in the same block
    # (several templates accept only one system message, at the start).
    if messages and messages[0].get("role") == "system":
        merged = f"{system}\n\n{messages[0].get('content', '')}"
        return [{**messages[0], "content": merged}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every EOS id the model's generation config and the tokenizer declare."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    return sorted(ids)


def _context_window(model: Any) -> int:
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    return int(getattr(config, "max_position_embeddings", None) or 1 << 30)


def _grammar_constraint(tokenizer: Any, ebnf: str, vocab_size: int) -> Any:
    # Imported on first use: xgrammar is only needed when the plan is constrained.
    from .decoding.constraints import GrammarConstraint

    return GrammarConstraint.from_ebnf(tokenizer, ebnf, vocab_size=vocab_size)


def _output_constraint(run: _Run, grammar: OutputGrammar) -> Any:
    """The constraint of an output grammar, stopping on the model's own stop tokens."""
    from .decoding.constraints import GrammarConstraint

    kw = {"vocab_size": run.vocab_size, "stop_token_ids": run.stop_ids or None}
    if grammar.json_schema is not None:
        return GrammarConstraint.from_json_schema(run.tok, grammar.json_schema, **kw)
    return GrammarConstraint.from_ebnf(run.tok, grammar.ebnf, **kw)


_MARKER_IDS: dict[int, tuple[Any, list[int], list[int]]] = {}
_MARKER_LOCK = threading.Lock()


def _banned_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(step opening bans, marker ids), computed once per tokenizer object."""
    with _MARKER_LOCK:
        hit = _MARKER_IDS.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1], hit[2]
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    markers = [i for i, text in enumerate(texts) if "#" in text]
    opening = [
        i
        for i, text in enumerate(texts)
        if "#" in text or "\n" in text or (text.strip() and not text.strip(". \u2026"))
    ]
    with _MARKER_LOCK:
        if len(_MARKER_IDS) > 16:  # a handful of tokenizers per process at most
            _MARKER_IDS.clear()
        _MARKER_IDS[id(tokenizer)] = (tokenizer, opening, markers)
    return opening, markers


def step_opening_banned_ids(tokenizer: Any) -> list[int]:
    """Ids of tokens a step must not open with (cached per tokenizer object).

    Those holding '#' or a newline (the next step marker) and those made of dots only (the
    plan's "......" placeholder, which small models copy right after the title list).
    """
    return _banned_ids(tokenizer)[0]


def marker_token_ids(tokenizer: Any) -> list[int]:
    """Ids of tokens holding '#' (a step marker would start), cached per tokenizer object."""
    return _banned_ids(tokenizer)[1]


def title_opening_ids(tokenizer: Any, titles: Sequence[str]) -> list[list[int]]:
    """Per step, the tokens its text may not open with: the first token of every OTHER title
    (written with and without a leading space), unless it also opens its own title.

    A small model tends to restate the neighbouring step's title ("####Price: Taste: ...").
    """
    firsts = []
    for title in titles:
        ids = set()
        for text in (title, " " + title, title.lower(), " " + title.lower()):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if encoded:
                ids.add(encoded[0])
        firsts.append(ids)
    return [
        sorted(set().union(*(f for j, f in enumerate(firsts) if j != b)) - firsts[b])
        for b in range(len(titles))
    ]


def resample_settings(
    temperature: float, seed: int | None, attempt: int
) -> tuple[float, int | None]:
    """(temperature, seed) of Stage-1 attempt ``attempt`` (1-based).

    The first attempt uses the call's settings. A retry explores: temperature
    ``PLAN_RETRY_TEMPERATURES[attempt - 2]`` (the last one after that) or the call's when
    higher, and seed ``base + 1000 * attempt``, where ``base`` is the call's seed, or 0 for a
    greedy call without one (so the same call always gives the same plan, and ``stream``
    equals ``invoke``); an unseeded sampled call stays unseeded (random by request).
    """
    if attempt <= 1:
        return temperature, seed
    step = PLAN_RETRY_TEMPERATURES[min(attempt - 2, len(PLAN_RETRY_TEMPERATURES) - 1)]
    base = seed if seed is not None else (0 if temperature == 0 else None)
    return max(temperature, step), None if base is None else base + 1000 * attempt


def step_token_budget(
    n_steps: int, step_max_tokens: int, tokens_left: int, context_left: int
) -> int:
    """New tokens each of ``n_steps`` parallel steps may take.

    The steps and the conclusion share what is left of ``max_tokens`` and of the context
    window in ``n_steps + 1`` equal parts; a step never gets more than ``step_max_tokens``.
    """
    return min(step_max_tokens, tokens_left // (n_steps + 1), context_left // (n_steps + 1))


def merged_steps_text(headers: Sequence[str], bodies: Sequence[str]) -> str:
    """The Stage-3 layout: each step after its header, one per line, as if written in a row."""
    return "".join(f"{h} {body}\n" for h, body in zip(headers, bodies, strict=True))


def steps_content(preamble: str, titles: Sequence[str], bodies: Sequence[str]) -> str:
    """The answer's content before the conclusion: preamble, then ``**Title**: body`` blocks."""
    steps_md = "".join(
        f"**{title}**: {body}\n\n" for title, body in zip(titles, bodies, strict=True)
    )
    return (preamble + "\n\n" if preamble else "") + steps_md


def drive(gen: Generator, sink: list | None = None) -> Any:
    """Run a generator to its return value, collecting yielded items into ``sink`` if given."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if sink is not None:
            sink.append(item)


def _stream_content(gen: Generator[int, None, Any], stream: TextStream) -> Generator:
    """Push each token of ``gen`` into ``stream``, yield its final text as ContentDelta, and
    return ``gen``'s result (the held-back tail is the caller's to ``finish()``)."""
    while True:
        try:
            token = next(gen)
        except StopIteration as stop:
            return stop.value
        if delta := stream.push(token):
            yield ContentDelta(delta)


def _first_timed(gen: Generator, timings: dict[str, float], key: str, since: float) -> Generator:
    """``gen`` passed through; ``timings[key]`` = seconds from ``since`` to its first item."""
    first = True
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if first:
            timings[key] = time.perf_counter() - since
            first = False
        yield item


class _DistinctTitles:
    """A ``LogitsConstraint`` over the plan (wrapping its grammar, if any): no title opens with
    the first token of an earlier title. Where the model's top choice would do so, the list is
    closed instead (``####%%%%``) once it has 2 titles; before that, those tokens are banned.

    A small model otherwise repeats its first title ("####Quit:......" six times), and forcing
    it past the repeat only makes it write unrelated titles. Titles are found in the text (a
    title starts right after each ``####``), whatever the tokenization of the marker.
    """

    def __init__(self, inner: Any, tokenizer: Any) -> None:
        self.inner = inner
        self.tok = tokenizer
        self.tokens: list[int] = []
        self.firsts: list[int] = []
        self.at_title = False
        # The token(s) that start the end marker's tail right after "####".
        tail = tokenizer.encode(END_MARKER, add_special_tokens=False)
        head = tokenizer.encode(STEP_MARKER, add_special_tokens=False)
        close = {tail[len(head)]} if tail[: len(head)] == head and len(tail) > len(head) else set()
        close |= set(tokenizer.encode(END_MARKER[len(STEP_MARKER) :], add_special_tokens=False)[:1])
        self.close_ids = sorted(close)

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The grammar's mask, then the rule above at a title start. ``logits``: ``[V]``."""
        if self.inner is not None:
            logits = self.inner.mask_logits(logits)
        if not (self.at_title and self.firsts):
            return logits
        if int(logits.argmax()) not in self.firsts:
            return logits
        close = torch.tensor(self.close_ids, dtype=torch.long, device=logits.device)
        if len(self.firsts) >= 2 and close.numel() and torch.isfinite(logits[close]).any():
            out = torch.full_like(logits, float("-inf"))
            out[close] = logits[close]
            return out
        out = logits.clone()
        out[self.firsts] = float("-inf")
        return out

    def advance(self, token_id: int) -> None:
        """Accept ``token_id`` (into the grammar too)."""
        if self.inner is not None:
            self.inner.advance(token_id)
        if self.at_title and not self.tok.decode([token_id]).startswith("%"):
            self.firsts.append(token_id)
        self.tokens.append(token_id)
        self.at_title = self.tok.decode(self.tokens[-4:]).endswith(STEP_MARKER)

    def is_terminated(self) -> bool:
        """When the grammar is complete (never without one)."""
        return self.inner is not None and self.inner.is_terminated()


class _NoPlanRetry(PlanFormatError):  # noqa: N818 - a PlanFormatError that ends the retries
    """The plan failed and a retry cannot help (no budget left, or cut off at its own limit)."""


class _Run:
    """State of one ``iter_answer`` call (nothing survives the call)."""

    def __init__(self, model, tokenizer, messages, config, cancel, tools) -> None:
        self.model = model
        self.tok = tokenizer
        self.messages = messages
        self.cfg = config
        self.cancel = cancel
        self.tools = tools
        self.params = SamplingParams(config.temperature, config.top_p, config.top_k)
        self.repetition = RepetitionControl(config.repetition_penalty, config.no_repeat_ngram_size)
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.ctx = _context_window(model)
        self.device = model_device(model)
        self.timings: dict[str, float] = {}
        self.output_tokens = 0
        self.input_tokens = 0
        self.plan_attempts = 0
        self.last_plan_error = ""
        self.notes: list[str] = []
        self.route, self.route_reason = forced_route(config)
        self.block_end: _BlockEnd | None = None  # how the last conclusion ended

    def encode(self, text: str) -> list[int]:
        # Step titles and texts are data: text spelling a special token stays text.
        split = not self.cfg.parse_special_tokens
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=split)

    def check_prompt(self, ids: list[int]) -> None:
        if len(ids) >= self.ctx:
            msg = (
                f"the prompt has {len(ids)} tokens but the model's context window is {self.ctx}; "
                "shorten the messages or use a model with a longer context"
            )
            raise ValueError(msg)

    # Stage 1 ----------------------------------------------------------------------------
    def plan(
        self,
        prompt: list[int],
        cache: DynamicCache,
        *,
        cap: int | None = None,
        preamble: bool = True,
    ) -> tuple[Plan, list[int], int]:
        """Decode and validate the plan; returns (plan, plan token ids, attempts).

        Attempts spend at most half of ``max_tokens`` together (the rest is the answer's,
        fallback included) and never run past the context window. A retry is made only when
        a plan can fit in what is left (`MIN_PLAN_TOKENS`, or ``plan_max_tokens`` if smaller);
        it samples at a higher temperature with a seed derived from the call's (0 without one,
        at temperature 0), so the same call gives the same plan. ``cap`` replaces that half
        (a later block's plan); ``preamble=False`` plans without the preamble line.
        """
        cfg = self.cfg
        self.plan_attempts = 0
        cap = cfg.max_tokens // 2 if cap is None else cap
        grammar = (
            plan_grammar_ebnf(
                cfg.max_branches, PLAN_TITLE_CHARS, PLAN_PREAMBLE_CHARS, preamble=preamble
            )
            if cfg.constrain_plan
            else None
        )
        spent = 0

        def attempt() -> tuple[Plan, list[int]]:
            nonlocal spent
            budget = min(cfg.plan_max_tokens, cap - spent, self.ctx - len(prompt))
            if budget < min(MIN_PLAN_TOKENS, cfg.plan_max_tokens) and self.plan_attempts > 0:
                raise _NoPlanRetry(
                    f"{self.last_plan_error}; no retry: {max(budget, 0)} plan tokens left of "
                    f"max_tokens={cfg.max_tokens} (plan attempts may use half)"
                )
            if budget < 1:
                raise _NoPlanRetry(f"no room for a plan (max_tokens={cfg.max_tokens})")
            self.plan_attempts += 1
            k = self.plan_attempts
            # Each attempt restarts from the prompt.
            crop_to(cache, len(prompt) - 1)
            temperature, seed = resample_settings(self.params.temperature, cfg.seed, k)
            params = replace(self.params, temperature=temperature)
            constraint = _DistinctTitles(
                _grammar_constraint(self.tok, grammar, self.vocab_size) if grammar else None,
                self.tok,
            )
            gen = iter_decode(
                self.model,
                prompt[-1:],
                cache,
                start=len(prompt) - 1,
                max_new_tokens=budget,
                params=params,
                seed=seed,
                stop_token_ids=self.stop_ids,
                stop_strings=() if grammar else (END_MARKER,),
                tokenizer=self.tok,
                constraint=constraint,
                cancel=self.cancel,
            )
            result = drive(gen, [])
            spent += len(result.token_ids)
            self.output_tokens += len(result.token_ids)
            text = self.tok.decode(result.token_ids, skip_special_tokens=True)
            try:
                plan = self.drop_copied_titles(
                    parse_plan(
                        text, max_branches=cfg.max_branches, max_title_chars=PLAN_TITLE_CHARS
                    )
                )
            except PlanFormatError as e:
                self.last_plan_error = str(e)
                raise
            return plan, result.token_ids

        # The prompt but its last token is prefilled once; every attempt feeds that last token.
        if len(prompt) > 1 and cache.get_seq_length() == 0:
            with torch.inference_mode():
                forward_tokens(self.model, torch.tensor(prompt[:-1], device=self.device), cache, 0)
        retrying = Retrying(
            stop=stop_after_attempt(cfg.plan_retries + 1),
            retry=retry_if_exception(
                lambda e: isinstance(e, PlanFormatError) and not isinstance(e, _NoPlanRetry)
            ),
            reraise=True,
        )
        plan, ids = retrying(attempt)
        return plan, ids, self.plan_attempts

    def drop_copied_titles(self, plan: Plan) -> Plan:
        """``plan`` without titles copied from the prompt's example (unless the question uses
        them); raises PlanFormatError when fewer than 2 titles remain."""
        question = " ".join(
            str(m.get("content") or "") for m in self.messages if m.get("role") == "user"
        ).casefold()
        copied = example_titles()
        kept = [t for t in plan.titles if t.casefold() not in copied or t.casefold() in question]
        if len(kept) == len(plan.titles):
            return plan
        if len(kept) < 2:
            dropped = [t for t in plan.titles if t not in kept]
            msg = f"fewer than 2 usable titles (copied from the prompt's example: {dropped})"
            raise PlanFormatError(msg)
        return plan.model_copy(update={"titles": kept})

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])


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
    run = _Run(model, tokenizer, messages, config, cancel, tools)
    t0 = time.perf_counter()
    try:
        result = yield from _dispatch(run, t0)
    except Cancelled as e:
        raise PipelineCancelled(str(e)) from e
    route = {"route": run.route, "route_reason": run.route_reason}
    return replace(result, report=result.report.model_copy(update=route))


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
    run = _Run(model, tokenizer, messages, config or PipelineConfig(), None, None)
    if run.cfg.mode == "auto" and run.route_reason is None:
        drive(_route(run))
    return run.route, run.route_reason


def _dispatch(run: _Run, t0: float) -> Generator:
    config = run.cfg
    if config.mode == "sequential":
        return (yield from _sequential(run, None, 0, t0))
    reason = _sequential_reason(config)
    if reason is not None:
        return (yield from _sequential(run, reason, 0, t0))
    if config.mode == "auto" and config.steps is None and not (yield from _route(run)):
        return (yield from _sequential(run, None, 0, t0))  # the model chose a direct answer
    return (yield from _parallel(run, t0))


def _sequential_reason(config: PipelineConfig) -> str | None:
    """Why a call that may plan is decoded sequentially anyway (tools, an output grammar)."""
    if config.sequential_reason is None and config.grammar is not None:
        return "an output grammar is set: the answer is decoded sequentially"
    return config.sequential_reason


def forced_route(config: PipelineConfig) -> tuple[str, str | None]:
    """(route, reason) of a call whose route the settings decide; in mode "auto" without
    ``steps``, ("plan", None) until the router (`_route`) decides."""
    if config.mode == "sequential":
        return "direct", "mode='sequential' never plans"
    if (reason := _sequential_reason(config)) is not None:
        return "direct", reason
    if config.steps is not None:
        return "plan", "steps= given: the caller's plan"
    if config.mode != "auto":
        return "plan", f"mode={config.mode!r} always plans"
    return "plan", None


class _YesNo:
    """The router's ``LogitsConstraint``: one token, the first of "yes" or "no" (either case),
    with ``bias`` added to the yes tokens. ``log_odds`` keeps the model's own (unbiased) best
    yes logit minus its best no logit."""

    def __init__(self, yes: list[int], no: list[int], bias: float) -> None:
        self.yes, self.no, self.bias = yes, no, bias
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


def _route(run: _Run) -> Generator[Event, None, bool]:
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
    choice = _YesNo(yes, no, cfg.route_bias)
    gen = iter_decode(
        run.model,
        prompt,
        DynamicCache(),
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
        f"route_bias {cfg.route_bias:+.2f})"
    )
    run.timings["route"] = time.perf_counter() - t
    yield StageEvent("route", {"route": run.route, "reason": run.route_reason})
    return plan


def _sequential(run: _Run, reason: str | None, attempts: int, t0: float) -> Generator:
    """Plain decoding of the whole answer from the caller's messages (also the fallback)."""
    if reason is not None:
        yield StageEvent("fallback", {"reason": reason})
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
    cache = DynamicCache()
    stream = TextStream(run.tok, stops, lstrip=not forced)
    t = time.perf_counter()
    if grammar is not None and grammar.prefix:
        yield ContentDelta(grammar.prefix)
    gen = iter_decode(
        run.model,
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
    result = yield from _stream_content(gen, stream)
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


def _parallel(run: _Run, t0: float) -> Generator:
    cfg = run.cfg
    tok = run.tok
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
    cache = DynamicCache()

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
    plan = plan.model_copy(update={"preamble": _whole_sentences(plan.preamble)})
    yield StageEvent("plan", {"titles": list(plan.titles), "preamble": plan.preamble})

    # Budgets: the steps and the conclusion must fit both max_tokens and the context window,
    # since Stage 3 lays the steps out one after another.
    n = len(plan.titles)
    prefix = [*prompt, *plan_ids, *run.encode("\n")]
    per_step, left_tokens, left_ctx = _step_budget(run, plan.titles, prefix)
    if per_step < MIN_STEP_TOKENS:
        reason = (
            f"budget too small for {n} parallel steps: each needs {MIN_STEP_TOKENS} tokens, and "
            f"{left_tokens} of max_tokens={cfg.max_tokens} and {left_ctx} of the context "
            f"window ({run.ctx}) are left; raise max_tokens or lower max_branches"
        )
        return (yield from _sequential(run, reason, attempts, t0))

    try:
        return (yield from _blocks(run, plan, prompt, prefix, cache, per_step, attempts, t0))
    except Cancelled:
        raise
    except Exception as e:
        reason = f"parallel decoding failed ({type(e).__name__}: {e})"
        if isinstance(e, torch.OutOfMemoryError) and run.device.type == "cuda":
            torch.cuda.empty_cache()
        return (yield from _sequential(run, reason, attempts, t0))


def _step_budget(run: _Run, titles: Sequence[str], prefix: list[int]) -> tuple[int, int, int]:
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


def _steps_and_conclusion(run, plan, prompt, prefix, cache, per_step, attempts, t0):
    cfg = run.cfg
    tok = run.tok
    n = len(plan.titles)
    # Bring the cache to exactly the prefix: Stage 1 left prompt + plan minus its last token.
    have = cache.get_seq_length()
    t = time.perf_counter()
    with torch.inference_mode():
        rest = torch.tensor(prefix[have:], device=run.device)
        prefix_logits = forward_tokens(run.model, rest, cache, have)
    headers = [step_header(title) for title in plan.titles]
    branch_prefixes = [run.encode(h) for h in headers]
    step_stops = (STEP_MARKER, *cfg.stop)
    streams = [TextStream(tok, step_stops, lstrip=True) for _ in range(n)]
    # The preamble opens the content, but is sent with the steps: a failure in Stage 2 falls
    # back to sequential decoding, and content already sent could not be taken back.
    preamble = plan.preamble.strip()
    out = yield from _decode_steps(
        run,
        plan.titles,
        prefix,
        branch_prefixes,
        per_step,
        cache,
        prefix_logits,
        streams,
        keep_kv=_reuse_requested(run),
    )
    for b in range(n):
        if tail := streams[b].finish():
            yield StepDelta(b, plan.titles[b], tail)
    run.timings["steps"] = time.perf_counter() - t
    bodies = [_body(tok, s, r, step_stops) for s, r in zip(streams, out.branches, strict=True)]
    branch_tokens = [len(r.token_ids) for r in out.branches]
    if out.width < n:
        run.notes.append(f"out of memory: steps decoded {out.width} at a time")
    run.output_tokens += sum(branch_tokens)
    yield StageEvent("steps_done", {"branch_tokens": branch_tokens})

    # Stage 3: the steps laid out in plan order, as if written one after another, then the
    # conclusion. The prefix cache is reused; the merged steps are prefilled, or with
    # conclusion_kv="reuse" their own KV from Stage 2 is laid out in a row (decoding.merge).
    t = time.perf_counter()
    steps_md = steps_content(preamble, plan.titles, bodies)
    yield ContentDelta(steps_md)
    laid = _reuse_steps_kv(run, prefix, cache, branch_prefixes, out) if out.branch_kv else None
    if laid is None:
        stage3 = run.encode(merged_steps_text(headers, bodies) + conclusion_cue())
        start, logits, context = len(prefix), None, prefix
    else:  # the cache holds the steps and the cue already
        stage3 = []
        start, logits, context = laid
    stream, finish_reason = yield from _conclusion(
        run, cache, stage3, start, context, t, logits=logits
    )
    run.timings["total"] = time.perf_counter() - t0
    content = steps_md + stream.text
    report = ParallelReport(
        mode_used="parallel",
        steps=list(plan.titles),
        branch_tokens=branch_tokens,
        branch_finish_reasons=[r.finish_reason for r in out.branches],
        decode_steps=out.forward_passes,
        tokens_per_forward=(out.tokens / out.forward_passes) if out.forward_passes else None,
        plan_attempts=attempts,
        conclusion_tokens=len(stream.tokens),
        conclusion_kv="reprefill" if laid is None else "reuse",
        timings=run.timings,
        attention=out.attention,
        notes=run.notes,
    )
    return AnswerResult(content, report, run.input_tokens, run.output_tokens, finish_reason)


def _stepped_steps_and_conclusion(run, plan, prompt, prefix, cache, per_step, attempts, t0):
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
    step_stops = (STEP_MARKER, *cfg.stop)
    headers = [step_header(title) for title in plan.titles]
    opening = title_opening_ids(tok, plan.titles)
    banned = [*step_opening_banned_ids(tok), *run.stop_ids]
    # Stage 1 left prompt + plan minus its last token in the cache (nothing with steps=).
    pos = cache.get_seq_length()
    row = list(prefix[:pos])  # the sequence the cache holds, in order
    feed = [*prefix[pos:], *run.encode(headers[0])]
    results, bodies = [], []
    for b, title in enumerate(plan.titles):
        stream = TextStream(tok, step_stops, lstrip=True)
        gen = iter_decode(
            run.model,
            feed,
            cache,
            start=pos,
            max_new_tokens=per_step,
            params=run.params,
            seed=None if cfg.seed is None else cfg.seed + b,
            stop_token_ids=run.stop_ids,
            stop_strings=step_stops,
            tokenizer=tok,
            suppress=SuppressFirst(banned, min(MIN_STEP_TOKENS, per_step // 2), opening[b]),
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
        bodies.append(_body(tok, stream, result, step_stops))
        # Keep the step's tokens that spell its text; the rest of the text, a newline and the
        # next header (or the cue) are fed with the next step.
        keep, text = _kept_tokens(tok, result, step_stops)
        row += [*feed, *result.token_ids[:keep]]
        pos = len(row)
        crop_to(cache, pos)
        glue = _glue(tok, result.token_ids, keep, text)
        feed = run.encode(glue + (headers[b + 1] if b + 1 < n else conclusion_cue()))
    run.timings["steps"] = time.perf_counter() - t
    branch_tokens = [len(r.token_ids) for r in results]
    run.output_tokens += sum(branch_tokens)
    yield StageEvent("steps_done", {"branch_tokens": branch_tokens})

    t = time.perf_counter()
    steps_md = steps_content(plan.preamble.strip(), plan.titles, bodies)
    yield ContentDelta(steps_md)
    stream, finish_reason = yield from _conclusion(run, cache, feed, pos, row, t)
    run.timings["total"] = time.perf_counter() - t0
    report = ParallelReport(
        mode_used="stepped",
        steps=list(plan.titles),
        branch_tokens=branch_tokens,
        branch_finish_reasons=[r.finish_reason for r in results],
        decode_steps=sum(branch_tokens),
        tokens_per_forward=1.0 if sum(branch_tokens) else None,
        plan_attempts=attempts,
        conclusion_tokens=len(stream.tokens),
        timings=run.timings,
        notes=run.notes,
    )
    content = steps_md + stream.text
    return AnswerResult(content, report, run.input_tokens, run.output_tokens, finish_reason)


def _conclusion(run, cache, feed, start, context, t, logits=None):
    """Stage 3's decoding: ``feed`` (the token ids the cache still lacks, ending with the
    conclusion cue) at position ``start``, then the conclusion; yields its ContentDelta items
    and returns ``(stream, finish_reason)``. ``context`` is the sequence before ``feed`` (for
    the repetition controls); ``t`` is when Stage 3 began; ``logits``: those after the cue
    when the cache holds it already (``feed`` is then empty).

    The steps are content already, so nothing here falls back: when the context is full (the
    merged steps can re-tokenize longer than decoded) or the conclusion fails, the answer ends
    after the steps, finish_reason "length", with a note. Sets ``timings["merge"]`` (Stage 3
    until the first conclusion token: the steps laid out in the cache, the cue prefilled) and
    ``timings["conclusion"]`` (all of Stage 3).
    """
    cfg, tok = run.cfg, run.tok
    room = run.ctx - start - len(feed)
    budget = min(cfg.max_tokens - run.output_tokens, room)
    stream = TextStream(tok, (*cfg.stop, STEP_MARKER), lstrip=True)
    finish_reason = "length"
    if room < 1:
        run.notes.append(f"context window ({run.ctx} tokens) full after the steps: no conclusion")
    elif budget < 1:
        run.notes.append(
            f"no conclusion: the plan and the steps used all of max_tokens={cfg.max_tokens}"
        )
    else:
        gen3 = iter_decode(
            run.model,
            feed,
            cache,
            start=start,
            max_new_tokens=budget,
            params=run.params,
            seed=cfg.seed,
            stop_token_ids=run.stop_ids,
            stop_strings=(*cfg.stop, STEP_MARKER),
            tokenizer=tok,
            cancel=run.cancel,
            # Right after the steps a small model tends to end the answer at once (EOS) or
            # start another step: neither may come before a few words of conclusion.
            suppress=SuppressFirst(
                [*run.stop_ids, *marker_token_ids(tok)], min(MIN_CONCLUSION_TOKENS, budget)
            ),
            repetition=run.repetition,
            context_ids=context,
            loop_guard=True,
            logits=logits,
        )
        try:
            timed = _first_timed(gen3, run.timings, "merge", t)
            out3 = yield from _stream_content(timed, stream)
            run.block_end = _BlockEnd([*context, *feed], stream.tokens, out3.stop)
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
    run.output_tokens += len(stream.tokens)
    if budget >= 1 and room >= 1 and not stream.text.strip():
        run.notes.append("the conclusion came out empty")
    run.timings["conclusion"] = time.perf_counter() - t
    return stream, finish_reason


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


def _reuse_requested(run: _Run) -> bool:
    """Whether Stage 2 keeps the steps' KV for Stage 3 (a note says why not when asked)."""
    if run.cfg.conclusion_kv != "reuse":
        return False
    from .decoding.merge import kv_reuse_problem

    problem = kv_reuse_problem(run.model)
    if problem is not None:
        run.notes.append(f"conclusion_kv='reuse' unavailable ({problem}): steps re-prefilled")
    return problem is None


def _reuse_steps_kv(run, prefix, cache, branch_prefixes, out):
    """Lay the steps' own KV and the cue out after the prefix (``decoding.merge``); returns
    (the row's length, the logits after the cue, the row), or None after a failure (noted;
    the cache holds the prefix again and the steps are re-prefilled)."""
    from .decoding.merge import lay_out_branches

    tok = run.tok
    stops = (STEP_MARKER, *run.cfg.stop)
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
        end, logits = lay_out_branches(run.model, cache, kvs, glue_ids, cancel=run.cancel)
    except Cancelled:
        raise
    except Exception as e:
        crop_to(cache, len(prefix))
        run.notes.append(f"conclusion_kv='reuse' failed ({type(e).__name__}: {e}): re-prefilled")
        return None
    row = list(prefix)  # in position order: each step's kept tokens, then its glue
    for ids, glue in zip(kept, glue_ids, strict=True):
        row += [*ids, *glue]
    return end, logits, row


@dataclass(frozen=True)
class _BlockEnd:
    """How a block's conclusion ended: ``context`` is the sequence before the conclusion
    (prefix, merged steps, cue), ``conclusion_ids`` its tokens, ``stop`` what stopped it."""

    context: list[int]
    conclusion_ids: list[int]
    stop: str | int | None


def _blocks(run, plan, prompt, prefix, cache, per_step, attempts, t0):
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
    steps = _stepped_steps_and_conclusion if run.cfg.mode == "stepped" else _steps_and_conclusion
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


def _next_block(run: _Run, cache: DynamicCache, number: int, earlier: set[str]) -> Generator:
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
    crop_to(cache, len(end.context))  # the conclusion's own tokens make way for its text
    with torch.inference_mode():
        rest = torch.tensor(context[len(end.context) : -1], device=run.device)
        if rest.numel():
            forward_tokens(run.model, rest, cache, len(end.context))
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
        crop_to(cache, len(context) - 1)
    yield StageEvent("plan", {"titles": list(plan.titles), "preamble": "", "block": number - 1})
    prefix = [*context, *plan_ids, *run.encode("\n")]
    per_step, left_tokens, _ = _step_budget(run, plan.titles, prefix)
    if per_step < MIN_STEP_TOKENS:
        run.notes.append(
            f"block {number}'s steps would get {per_step} tokens each ({left_tokens} of "
            f"max_tokens={cfg.max_tokens} left): the answer ends there"
        )
        return None
    return plan, prefix, per_step, attempts


def block_report(report: ParallelReport) -> BlockReport:
    """The `BlockReport` of a one-block answer's report."""
    stages = ("plan", "steps", "conclusion")
    return BlockReport(
        steps=report.steps,
        branch_tokens=report.branch_tokens,
        decode_steps=report.decode_steps,
        conclusion_tokens=report.conclusion_tokens,
        plan_attempts=report.plan_attempts,
        timings={k: report.timings[k] for k in stages if k in report.timings},
    )


def _merged_blocks(run: _Run, results: list[AnswerResult], t0: float) -> AnswerResult:
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


def _whole_sentences(text: str) -> str:
    """``text`` up to its last sentence end, when it ends mid-sentence after a full one."""
    text = text.strip()
    if not text or text[-1] in ".!?:":
        return text
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    return text[: cut + 1] if cut > 0 else text


def _body(tok: Any, stream: TextStream, result: Any, stops: Sequence[str]) -> str:
    """A step's text for the content: what was streamed, or, when the loop guard ended the
    step, its tokens up to the first copy of the repeated unit."""
    if result.finish_reason != "repetition":
        return stream.text.strip()
    kept = TextStream(tok, stops, lstrip=True)
    for token in trim_loop(result.token_ids):
        kept.push(token)
    kept.finish()
    return kept.text.strip()


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
    run, titles, prefix, branch_prefixes, per_step, cache, prefix_logits, streams, keep_kv=False
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
    step_stops = (STEP_MARKER, *cfg.stop)
    opening = title_opening_ids(run.tok, titles)
    start = 0
    while start < n:
        group = list(range(start, min(n, start + width)))
        gen = iter_decode_branches(
            run.model,
            prefix,
            [branch_prefixes[i] for i in group],
            max_new_tokens=per_step,
            params=run.params,
            seed=None if cfg.seed is None else cfg.seed + group[0],
            stop_token_ids=run.stop_ids,
            stop_strings=step_stops,
            tokenizer=run.tok,
            prefix_cache=cache,
            prefix_logits=prefix_logits,
            attention=cfg.attention,
            cancel=run.cancel,
            # Right after the plan's title list a small model tends to start the next title at
            # once ("\n####...") or copy the placeholder: a step may not open with those.
            suppress=SuppressFirst(
                [*run.stop_ids, *step_opening_banned_ids(run.tok)],
                min(MIN_STEP_TOKENS, per_step // 2),
            ),
            # ... nor restate another step's title; every step runs under the loop guard.
            opening_banned_ids=[opening[i] for i in group],
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
            yield StageEvent("steps_retry", {"reason": "out of memory", "width": width})
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


def answer(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    config: PipelineConfig | None = None,
    **kwargs: Any,
) -> AnswerResult:
    """Run ``iter_answer`` to the end and return the merged answer."""
    return drive(iter_answer(model, tokenizer, messages, config or PipelineConfig(), **kwargs), [])
