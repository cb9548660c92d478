"""Prompts, token-id sets and text helpers of the stages (no decoding here).

Contract: ``render_prompt`` applies the model's chat template; ``check_question`` raises on
input the pipeline cannot answer, with the fix; the ``*_ids`` helpers give the token ids the
stages ban or stop on (cached per tokenizer, thread-safe); ``DistinctTitles`` is the logits
guard that keeps a plan's titles from opening alike; budgets and step markdown are pure
functions of their arguments.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..plan import PlanFormatError
from ..prompts import (
    END_MARKER,
    STEP_MARKER,
)
from ..schemas import BlockReport, ParallelReport
from .settings import PLAN_RETRY_TEMPERATURES

__all__ = [
    "DistinctTitles",
    "NoPlanRetry",
    "block_report",
    "check_question",
    "context_window",
    "grammar_constraint",
    "marker_token_ids",
    "merged_steps_text",
    "newline_token_ids",
    "record_quote",
    "record_rest",
    "record_titles",
    "render_prompt",
    "resample_settings",
    "step_opening_banned_ids",
    "step_token_budget",
    "steps_content",
    "stop_token_ids",
    "title_opening_ids",
    "whole_sentences",
    "with_system",
]


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
    result may be empty), and a tool message must answer a call an earlier assistant message
    made: its ``tool_call_id`` is that call's id (a call without an id may be answered by any
    result). Without this, a model answers the planning prompt's example instead, or reads a
    stray result as the output of a call it never made.
    """
    if not messages:
        raise ValueError("messages is empty: pass at least one user message")
    ids: set[Any] = set()  # ids of the calls made so far; None for a call without one
    last = None
    for message in messages:
        role = message.get("role")
        if role == "assistant":
            ids.update(call.get("id") or None for call in message.get("tool_calls") or ())
        if role == "tool" and message.get("tool_call_id") not in ids and None not in ids:
            made = sorted(map(str, ids)) if ids else "none"
            msg = (
                f"a tool message (tool_call_id={message.get('tool_call_id')!r}) answers no "
                f"earlier tool call (the ids of earlier calls: {made}): give it the id of the "
                "AIMessage tool call it answers and put that AIMessage before it, or pass the "
                "text as a user message"
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


def context_window(model: Any) -> int:
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    return int(getattr(config, "max_position_embeddings", None) or 1 << 30)


def grammar_constraint(tokenizer: Any, ebnf: str, vocab_size: int) -> Any:
    # Imported on first use: xgrammar is only needed when the plan is constrained.
    from ..decoding.constraints import GrammarConstraint

    return GrammarConstraint.from_ebnf(tokenizer, ebnf, vocab_size=vocab_size)


_MARKER_IDS: dict[int, tuple[Any, list[int], list[int], list[int]]] = {}


_MARKER_LOCK = threading.Lock()


def _banned_ids(tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """(step opening bans, marker ids, newline ids), computed once per tokenizer object."""
    with _MARKER_LOCK:
        hit = _MARKER_IDS.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1], hit[2], hit[3]
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    markers = [i for i, text in enumerate(texts) if "#" in text]
    newlines = [i for i, text in enumerate(texts) if "\n" in text]
    opening = [
        i
        for i, text in enumerate(texts)
        if "#" in text or "\n" in text or (text.strip() and not text.strip(". \u2026"))
    ]
    with _MARKER_LOCK:
        if len(_MARKER_IDS) > 16:  # a handful of tokenizers per process at most
            _MARKER_IDS.clear()
        _MARKER_IDS[id(tokenizer)] = (tokenizer, opening, markers, newlines)
    return opening, markers, newlines


def step_opening_banned_ids(tokenizer: Any) -> list[int]:
    """Ids of tokens a step must not open with (cached per tokenizer object).

    Those holding '#' or a newline (the next step marker) and those made of dots only (the
    plan's "......" placeholder, which small models copy right after the title list).
    """
    return _banned_ids(tokenizer)[0]


def marker_token_ids(tokenizer: Any) -> list[int]:
    """Ids of tokens holding '#' (a step marker would start), cached per tokenizer object."""
    return _banned_ids(tokenizer)[1]


def newline_token_ids(tokenizer: Any) -> list[int]:
    """Ids of tokens holding a newline, cached per tokenizer object."""
    return _banned_ids(tokenizer)[2]


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


def record_titles(message: str, titles: Sequence[str]) -> bool:
    """True when every title is a record of the message's material: it occurs, as written, in
    a line of ``message`` above its last line (the question): "Oscar Popescu" in
    "1. Name: Oscar Popescu; GPA: 3.81" of a list of records followed by a question about them.
    Titles a question only mentions ("Taste" in "Compare tea and coffee on taste") are not."""
    lines = [line for line in message.splitlines() if line.strip()]
    material = lines[:-1]
    return bool(titles) and all(any(t in line for line in material) for t in titles)


def _record_split(message: str, title: str) -> tuple[str, str] | None:
    """The first line of ``message`` that holds ``title``, cut after the title: (up to and
    with the title, the rest of the line); None where no line holds it."""
    line = next((x for x in message.splitlines() if title in x), None)
    if line is None:
        return None
    end = line.index(title) + len(title)
    return line[:end], line[end:]


def record_quote(message: str, title: str) -> str:
    """The first line of ``message`` that holds ``title``, up to the title's end (its list
    number dropped): "Name: Oscar Popescu" of "1. Name: Oscar Popescu; GPA: 3.81"."""
    split = _record_split(message, title)
    if split is None:
        return title
    return re.sub(r"^\(?\d+[.)]\s*", "", split[0].strip())


def record_rest(message: str, title: str) -> str:
    """The rest of the first line of ``message`` that holds ``title``, after the title ("; GPA:
    3.81; Major: Biology"); "" where no line holds it."""
    split = _record_split(message, title)
    return "" if split is None else split[1]


def steps_content(preamble: str, titles: Sequence[str], bodies: Sequence[str]) -> str:
    """The answer's content before the conclusion: preamble, then ``**Title**: body`` blocks."""
    steps_md = "".join(
        f"**{title}**: {body}\n\n" for title, body in zip(titles, bodies, strict=True)
    )
    return (preamble + "\n\n" if preamble else "") + steps_md


class DistinctTitles:
    """A ``LogitsConstraint`` over the plan (wrapping its grammar, if any): no title opens with
    the first token of an earlier title. Where the model's top choice would do so, the list is
    closed instead (``####%%%%``) once it has 2 titles; before that, those tokens are banned.

    A small model otherwise repeats its first title ("####Quit:......" six times), and forcing
    it past the repeat only makes it write unrelated titles. Titles are found in the text (a
    title starts right after each ``####``), whatever the tokenization of the marker.

    ``rest(k)``, where given, is the plan grammar's EBNF from a title start after ``k``
    complete step lines: a backend that runs only the grammar (a server) applies the rule to
    the tokens it returns (``verdict``) and continues a cut plan under it.
    """

    def __init__(
        self,
        inner: Any,
        tokenizer: Any,
        rest: Callable[[int], str | None] | None = None,
        *,
        preamble: bool = False,
    ) -> None:
        self.inner = inner
        self.tok = tokenizer
        self.rest = rest
        # The grammar opens with the plan's preamble line (`plan_grammar_ebnf(preamble=True)`):
        # until its newline, the grammar's state is a function of its length alone.
        self.preamble = preamble and hasattr(inner, "name_state")
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
        if self.preamble:
            text = self.inner.accepted_text()
            if "\n" in text:
                self.preamble = False
            elif "\ufffd" not in text:
                # Its masks near the length bound cost xgrammar 5-30 ms each: share them.
                self.inner.name_state(("plan preamble", len(text)))
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

    def verdict(self, token_id: int) -> str:
        """The rule on a chosen token: "ok", "close" (it repeats a title's first token and the
        list has 2 titles: close it instead) or "ban" (it repeats one before that)."""
        if not (self.at_title and token_id in self.firsts):
            return "ok"
        return "close" if len(self.firsts) >= 2 else "ban"

    def close_tail_ids(self) -> list[int]:
        """The ids that close the list after a step line's ``####`` (``%%%%``)."""
        return self.tok.encode(END_MARKER[len(STEP_MARKER) :], add_special_tokens=False)

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


class NoPlanRetry(PlanFormatError):  # noqa: N818 - a PlanFormatError that ends the retries
    """The plan failed and a retry cannot help (no budget left, or cut off at its own limit)."""


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


def whole_sentences(text: str) -> str:
    """``text`` up to its last sentence end, when it ends mid-sentence after a full one."""
    text = text.strip()
    if not text or text[-1] in ".!?:":
        return text
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
    return text[: cut + 1] if cut > 0 else text
