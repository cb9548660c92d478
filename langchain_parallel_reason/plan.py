"""Parse, render and constrain the Stage-1 plan text.

Contract: `parse_plan` turns any string into a validated `Plan` or raises `PlanFormatError`
with a short reason, never another exception. It repairs before it rejects: empty, duplicate and
placeholder titles ("Title", "Step 1", a bare number) are dropped, and the plan is kept when at
least 2 distinct titles remain. `plan_grammar_ebnf` gives an xgrammar EBNF whose every complete
match has the plan's shape (what no grammar rules out, repeats and placeholders, is repaired).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import ValidationError

from langchain_parallel_reason.prompts import END_MARKER, PLACEHOLDER, STEP_MARKER
from langchain_parallel_reason.schemas import DEFAULT_MAX_BRANCHES, DEFAULT_MAX_TITLE_CHARS, Plan

__all__ = [
    "PlanFormatError",
    "format_plan",
    "is_placeholder_title",
    "parse_plan",
    "plan_grammar_ebnf",
    "repair_titles",
]


class PlanFormatError(ValueError):
    """The Stage-1 text is not a usable plan; ``str(error)`` is a short human reason."""


# What may follow a title's colon: any run of dots (the model rarely writes exactly six),
# Unicode ellipses, or nothing, plus trailing whitespace. Anything else is step content,
# which means the model skipped the plan and started the steps.
_PLACEHOLDER_RE = re.compile(r"[.\u2026\s]*")

# Python's str.isspace() code points (checked by a unit test). The grammar keeps them off
# both ends of a title, so the title the model writes is the title `Plan` keeps after strip().
_SPACE_CLASS = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# C0 and C1 control characters: never useful in a title or preamble, and \r, \x0b, \x1c..
# would otherwise split lines for tools that use str.splitlines(). Surrogates too: xgrammar's
# negated classes otherwise accept their UTF-8 form (ED A0 80..), which is not valid UTF-8 and
# decodes to three U+FFFD each, so a title or preamble would outgrow its limit.
_CONTROL_CLASS = r"\x00-\x1f\x7f-\x9f\ud800-\udfff"


# Titles a small model writes when it copies the format instead of naming a part of the question:
# a generic word, optionally numbered ("Title", "Step 1", "Part A", "Point 2."), or a stage name
# that depends on the other steps ("Conclusion", "Summary").
_PLACEHOLDER_TITLE_RE = re.compile(
    r"(?:(?:title|step|part|item|point|aspect|topic|section|heading|subtitle|name|question"
    r"|answer|example|idea|option|factor|reason|task|thing|category|placeholder)s?"
    r"(?:\s*(?:[\d#.)\-]+|[a-z]|one|two|three|four|five|six))?"
    r"|conclusion|summary|introduction|final answer)\W*",
    re.IGNORECASE,
)


def is_placeholder_title(title: str) -> bool:
    """True for a title that names nothing: no letter at all ("1", "...", "#2"), or a generic
    word of the format, optionally numbered ("Title", "Step 1", "Part B"), or "Conclusion"."""
    text = title.strip()
    return not any(ch.isalpha() for ch in text) or bool(_PLACEHOLDER_TITLE_RE.fullmatch(text))


def repair_titles(titles: list[str]) -> tuple[list[str], list[str]]:
    """Split ``titles`` into (kept, dropped): empty, placeholder and repeated titles (ignoring
    case; the first one stays) are dropped, the others kept in order."""
    kept: list[str] = []
    dropped: list[str] = []
    seen: set[str] = set()
    for title in titles:
        key = title.strip().casefold()
        if not key or key in seen or is_placeholder_title(title):
            dropped.append(title.strip())
            continue
        seen.add(key)
        kept.append(title)
    return kept, dropped


def _check_limit(name: str, value: int, minimum: int) -> None:
    """Raise ValueError unless `value` is an int of at least `minimum` (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{name} must be an integer >= {minimum}, got {value!r}"
        raise ValueError(msg)


def parse_plan(
    text: str,
    *,
    max_branches: int = DEFAULT_MAX_BRANCHES,
    max_title_chars: int = DEFAULT_MAX_TITLE_CHARS,
) -> Plan:
    """Parse Stage-1 text (preamble, ``####Title:......`` lines, ``####%%%%``) into a `Plan`.

    Repaired: empty, placeholder (`is_placeholder_title`) and repeated titles are dropped when
    at least 2 distinct titles remain (see `repair_titles`); otherwise the plan is rejected.
    Tolerated: blank lines and surrounding whitespace; any number of dots (or none, or
    ``…``) after a title's colon; text after the first ``####%%%%`` (the model's detailed
    steps), which is ignored. A missing ``####%%%%`` is tolerated when every title line is
    complete, so a plan cut off by a stop string still parses; a last title line cut off
    before its colon is rejected, since the title itself may be incomplete. The preamble is
    everything before the first line starting with ``####``.

    Args:
        text: The assistant's Stage-1 output.
        max_branches: Most step titles accepted.
        max_title_chars: Longest title accepted, in characters after stripping.

    Returns:
        The validated plan.

    Raises:
        PlanFormatError: For any text that is not a usable plan, with a short reason such
            as ``"no step titles"``, ``"only 1 step"``, ``"too many steps (12 > 8)"`` or
            ``"fewer than 2 usable titles (dropped: 'Step 1', 'Step 2')"``. No other exception escapes for string input.
        ValueError: If ``max_branches < 2`` or ``max_title_chars < 1`` (a caller bug).
    """
    _check_limit("max_branches", max_branches, 2)
    _check_limit("max_title_chars", max_title_chars, 1)
    if not isinstance(text, str):
        msg = f"plan text must be a string, got {type(text).__name__}"
        raise PlanFormatError(msg)

    end = text.find(END_MARKER)
    closed = end >= 0
    # Only "\n" ends a line: the grammar and the step markers know no other line break.
    lines = (text[:end] if closed else text).split("\n")
    first = next((i for i, line in enumerate(lines) if line.lstrip().startswith(STEP_MARKER)), None)
    if first is None:
        msg = "no step titles"
        raise PlanFormatError(msg)
    preamble = "\n".join(lines[:first])
    body = [line.strip() for line in lines[first:] if line.strip()]

    titles: list[str] = []
    for index, line in enumerate(body):
        number = index + 1
        if not line.startswith(STEP_MARKER):
            msg = f"text between step titles: {_snippet(line)}"
            raise PlanFormatError(msg)
        # The last colon followed only by placeholder characters ends the title; a colon
        # inside the title is then left to `Plan`, which names it as the problem.
        title, colon, rest = line[len(STEP_MARKER) :].rpartition(":")
        if not colon:
            if not closed and index == len(body) - 1:
                msg = "plan cut off in the middle of a step title"
            else:
                msg = f"step {number} has no ':' after its title"
            raise PlanFormatError(msg)
        if not _PLACEHOLDER_RE.fullmatch(rest):
            msg = f"step {number} has text after its title (expected '####Title:{PLACEHOLDER}')"
            raise PlanFormatError(msg)
        titles.append(title)

    kept, dropped = repair_titles(titles)
    if dropped and len(kept) < 2:
        shown = ", ".join(repr(t) for t in dropped[:4]) + (", ..." if len(dropped) > 4 else "")
        msg = f"fewer than 2 usable titles (dropped: {shown})"
        raise PlanFormatError(msg)
    titles = kept
    context = {"max_branches": max_branches, "max_title_chars": max_title_chars}
    try:
        return Plan.model_validate({"preamble": preamble, "titles": titles}, context=context)
    except ValidationError as exc:
        reason = _reason(exc)
    # Raised outside the except block: an error raised inside would keep the ValidationError
    # as its __context__, and pydantic-core hides from the garbage collector that it holds the
    # validator's exception, whose frames reach the caller's (e.g. the decoder's KV cache):
    # a reference cycle the collector cannot free.
    raise PlanFormatError(reason)


def _snippet(line: str, limit: int = 40) -> str:
    """Quote the start of an offending line for an error message."""
    return repr(line if len(line) <= limit else line[:limit] + "...")


def _reason(exc: ValidationError) -> str:
    """Return the short message of the first validation error, without Pydantic's framing."""
    error = exc.errors()[0]
    original = error.get("ctx", {}).get("error")
    if original is not None:
        return str(original)
    return str(error.get("msg", "invalid plan"))


def format_plan(plan: Plan) -> str:
    """Render `plan` as canonical Stage-1 text: preamble line, title lines, ``####%%%%``.

    ``parse_plan(format_plan(plan))`` returns an equal plan. An empty preamble is left out.
    """
    lines = [plan.preamble] if plan.preamble else []
    lines += [f"{STEP_MARKER}{title}:{PLACEHOLDER}" for title in plan.titles]
    lines.append(END_MARKER)
    return "\n".join(lines)


def plan_grammar_ebnf(
    max_branches: int,
    max_title_chars: int = 60,
    max_preamble_chars: int = 160,
    *,
    preamble: bool = True,
    titles: Sequence[str] | None = None,
    done_steps: int | None = None,
) -> str:
    """Return an xgrammar EBNF grammar that forces the exact Stage-1 plan shape.

    The shape: a preamble of 1..``max_preamble_chars`` characters (no ``#``, no control
    characters or surrogates), a newline, 2..``max_branches`` lines ``####<title>:......``
    each ending with a newline, then ``####%%%%``. A title has 1..``max_title_chars``
    characters, none of them ``#``, ``:``, a control character or a surrogate, starts and
    ends with a non-space character and does not start with ``%`` (so it cannot be mistaken
    for the closing marker) nor with a digit or a dot (a small model otherwise numbers its
    steps instead of naming them). Every repetition is bounded, so constrained decoding always
    terminates. Duplicate and placeholder titles are left to `parse_plan`, which drops them.

    Args:
        max_branches: Most step lines; at least 2.
        max_title_chars: Longest title; at least 1. Keep it at most the
            ``max_title_chars`` given to `parse_plan`.
        max_preamble_chars: Longest preamble; at least 1 (`Plan` accepts up to 400).
        preamble: False leaves the preamble line out: the text starts with the first step
            line (a later block, which the model opens by writing ``####`` after a conclusion).
        titles: Grounded titles (e.g. `titles.title_candidates` of the question): when
            given, each title is one of them, written exactly, and the plan has
            2..min(len(titles), max_branches) steps, each title at most once (the first 6
            titles are offered); the model picks which and in what order. None: free titles.
        done_steps: The rest of a plan (free titles only): the text starts at a title, right
            after the ``####`` of a step line that follows ``done_steps`` complete ones (a
            server that cannot resume a grammar gets this one to continue a cut plan).

    Raises:
        ValueError: If a limit is out of range, or ``titles`` has fewer than 2 entries or
            one that is not a valid title (empty, longer than ``max_title_chars``, with
            ``#``, ``:``, a control character, or spaces at its ends), or ``done_steps`` is
            given with ``titles`` or leaves no step to write.
    """
    _check_limit("max_branches", max_branches, 2)
    _check_limit("max_title_chars", max_title_chars, 1)
    _check_limit("max_preamble_chars", max_preamble_chars, 1)
    if titles is not None:
        _check_titles(titles, max_title_chars)
    most = max_branches if titles is None else min(max_branches, len(titles), _MAX_GROUNDED)
    preamble_char = f"[^#{_CONTROL_CLASS}]"
    head = f"preamble {_ebnf_string(chr(10))} " if preamble else ""
    body = f"step{{2,{most}}}"
    if done_steps is not None:
        if titles is not None or not 0 <= done_steps < most:
            msg = f"done_steps must be 0..{most - 1} with free titles, got {done_steps}"
            raise ValueError(msg)
        # This step's line after its "####", then the steps still allowed (at least 2 in all).
        low, high = max(0, 1 - done_steps), most - done_steps - 1
        more = f" step{{{low},{high}}}" if high > 0 else ""
        head, body = "", f"title {_ebnf_string(f':{PLACEHOLDER}' + chr(10))}{more}"
    rules = [
        f"root ::= {head}{body} {_ebnf_string(END_MARKER)}",
        *(
            [
                f"preamble ::= {preamble_char} preamble_rest",
                *_bounded_repeat("preamble_rest", preamble_char, max_preamble_chars - 1),
            ]
            if preamble
            else []
        ),
        f"step ::= {_ebnf_string(STEP_MARKER)} title {_ebnf_string(f':{PLACEHOLDER}' + chr(10))}",
    ]
    if titles is not None:
        rules[0] = f"root ::= {head}used_0"
        return "\n".join(rules[:-1] + _distinct_steps(titles[:_MAX_GROUNDED], most)) + "\n"
    if max_title_chars == 1:
        rules.append("title ::= title_first")
    else:
        rules.append("title ::= title_first | title_first title_mid title_last")
        rules += _bounded_repeat("title_mid", "title_inner", max_title_chars - 2)
    rules += [
        f"title_first ::= [^#:%0-9.{_CONTROL_CLASS}{_SPACE_CLASS}]",
        f"title_inner ::= [^#:{_CONTROL_CLASS}]",
        f"title_last ::= [^#:{_CONTROL_CLASS}{_SPACE_CLASS}]",
    ]
    return "\n".join(rules) + "\n"


# Grounded titles beyond this many are not offered: the grammar has a rule per subset.
_MAX_GROUNDED = 6


def _distinct_steps(titles: Sequence[str], most: int) -> list[str]:
    """Rules ``used_<mask>``: the step lines still allowed once the titles in ``mask`` (a bit
    per title) were written, so no title is written twice, however the model spells it in
    tokens; the closing marker is allowed from the second step, forced at ``most`` steps."""
    rules = []
    for mask in range(1 << len(titles)):
        count = bin(mask).count("1")
        options = [
            f"{_ebnf_string(STEP_MARKER + t + ':' + PLACEHOLDER + chr(10))} used_{mask | 1 << i}"
            for i, t in enumerate(titles)
            if not mask & 1 << i and count < most
        ]
        if count >= 2:
            options.append(_ebnf_string(END_MARKER))
        if options:
            rules.append(f"used_{mask} ::= " + " | ".join(options))
    return rules


_BAD_TITLE_RE = re.compile(f"[#:{_CONTROL_CLASS}]")


def _check_titles(titles: Sequence[str], max_title_chars: int) -> None:
    """Raise ValueError unless ``titles`` holds 2 or more valid grounded titles."""
    if isinstance(titles, str) or len(titles) < 2:
        msg = f"titles must list at least 2 titles, got {titles!r}"
        raise ValueError(msg)
    for title in titles:
        if (
            not isinstance(title, str)
            or not title
            or len(title) > max_title_chars
            or title != title.strip()
            or title.startswith("%")
            or _BAD_TITLE_RE.search(title)
            or is_placeholder_title(title)
        ):
            msg = (
                f"invalid grounded title {title!r}: 1..{max_title_chars} characters, "
                "no '#', ':' or control character, no spaces at its ends, not starting with '%', "
                "not a placeholder"
            )
            raise ValueError(msg)


# Up to this many repetitions are written as a plain `item{0,n}`; longer runs are split into
# chunks of `_CHUNK` items. Measured on SmolLM2's 49k vocabulary (2 CPU cores), with 60-char
# titles and a 160-char preamble: all plain compiles in 1-3 s (a mask per position); chunks of
# about sqrt(n) compile in 0.1 s but cost about 11 ms per token to mask (tokens that cross a
# chunk end are checked at run time); chunks of 40 compile in about 0.5 s, about 1 ms per token.
_PLAIN_REPEAT_MAX = 64
_CHUNK = 40


def _bounded_repeat(name: str, item: str, most: int) -> list[str]:
    """Return EBNF rules defining `name` as 0..`most` repetitions of `item`.

    xgrammar precomputes a token mask for every position of a bounded repetition, so long
    runs are written as ``chunk{0,q-1} item{0,s-1} | chunk{q} item{0,r}`` with
    ``chunk ::= item{s}`` and ``most = q*s + r``: the same strings (each length has exactly
    one split), with s + s + r positions to precompute instead of `most`.
    """
    if most == 0:
        return [f'{name} ::= ""']
    if most <= _PLAIN_REPEAT_MAX:
        return [f"{name} ::= {item}{{0,{most}}}"]
    chunks, rest = divmod(most, _CHUNK)  # chunks >= 1 because most > _CHUNK
    chunk = f"{name}_chunk"
    # Lengths 0..q*s-1: fewer than q chunks, then a tail shorter than a chunk.
    fewer = f"{chunk}{{0,{chunks - 1}}} " if chunks > 1 else ""
    short = f"{fewer}{item}{{0,{_CHUNK - 1}}}"
    # Lengths q*s..most: exactly q chunks, then at most r items.
    full = f"{chunk}{{{chunks}}}" + (f" {item}{{0,{rest}}}" if rest else "")
    return [f"{name} ::= {short} | {full}", f"{chunk} ::= {item}{{{_CHUNK}}}"]


def _ebnf_string(text: str) -> str:
    """Quote `text` as an EBNF string literal (escaping backslash, quote and newline)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
