"""Stage-1 plan parsing, rendering and the plan grammar's text."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_parallel_reason import plan as plan_module
from langchain_parallel_reason.plan import (
    PlanFormatError,
    format_plan,
    is_placeholder_title,
    parse_plan,
    plan_grammar_ebnf,
    repair_titles,
)
from langchain_parallel_reason.schemas import Plan

GOOD = """Let me look at each drink in turn.
####Taste:......
####Caffeine:......
####Price:......
####%%%%
"""


def _plan_text(*titles: str, preamble: str = "Intro.", end: str = "####%%%%") -> str:
    """Stage-1 text with the given title lines."""
    lines = [preamble, *(f"####{t}:......" for t in titles)]
    return "\n".join(lines) + "\n" + end


def test_parses_the_documented_example() -> None:
    plan = parse_plan(GOOD)
    assert plan.preamble == "Let me look at each drink in turn."
    assert plan.titles == ["Taste", "Caffeine", "Price"]


@pytest.mark.parametrize(
    "text",
    [
        "\n\n  " + GOOD.replace("\n", "\n  ") + "\n\n",  # indented, blank lines around
        GOOD.replace("......", "..."),  # fewer dots
        GOOD.replace("......", "............"),  # more dots
        GOOD.replace("......", ""),  # no placeholder at all
        GOOD.replace("......", "\u2026"),  # a Unicode ellipsis
        GOOD.replace("......", "......   \t"),  # trailing whitespace
        GOOD.replace("\n####", "\n\n####"),  # blank lines between titles
        GOOD.replace("####Taste", "####  Taste  "),  # spaces around a title
        GOOD.removesuffix("####%%%%\n"),  # closing marker missing, every line complete
        GOOD.replace("......\n####%%%%", "......####%%%%"),  # marker glued to the last line
    ],
)
def test_tolerated_variations(text: str) -> None:
    assert parse_plan(text).titles == ["Taste", "Caffeine", "Price"]


def test_text_after_closing_marker_is_ignored() -> None:
    text = GOOD + "####Taste: mild.\n####Caffeine: some\n####%%%%\nConclusion: tea."
    assert parse_plan(text).titles == ["Taste", "Caffeine", "Price"]


def test_no_preamble_gives_empty_preamble() -> None:
    plan = parse_plan("####A:......\n####B:......\n####%%%%")
    assert plan.preamble == ""
    assert plan.titles == ["A", "B"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no step titles"),
        ("   \n\n", "no step titles"),
        ("I will just answer: 42.", "no step titles"),
        ("####%%%%\n####A:......\n####B:......", "no step titles"),  # list after the end
        (_plan_text("Only"), "only 1 step"),
        (_plan_text(*(f"City {i}" for i in range(12))), "too many steps (12 > 8)"),
        # Repaired first: duplicates, empty and placeholder titles are dropped, and a plan
        # with fewer than 2 titles left is rejected with what was dropped.
        (_plan_text("Taste", "taste"), "fewer than 2 usable titles (dropped: 'taste')"),
        (_plan_text("Taste", "  TASTE "), "fewer than 2 usable titles (dropped: 'TASTE')"),
        (_plan_text("A", "   "), "fewer than 2 usable titles (dropped: '')"),
        (_plan_text("Title", "Step 1", "2"), "fewer than 2 usable titles (dropped: 'Title', "),
        (_plan_text("Taste", "Step 2"), "fewer than 2 usable titles (dropped: 'Step 2')"),
        (_plan_text("A", "x" * 81), "step 2 title too long (81 > 80 chars)"),
        (_plan_text("Step 1: Taste", "B"), "step 1 title contains ':'"),
        (_plan_text("A", "####B"), "step 2 title contains '####'"),
        ("Intro ####\n####A:......\n####B:......\n####%%%%", "preamble contains '####'"),
        ("x" * 401 + "\n####A:......\n####B:......", "preamble too long (401 > 400 chars)"),
        ("Intro\n####A:......\n####B", "plan cut off in the middle of a step title"),
        ("Intro\n####A:......\n####B\n####%%%%", "step 2 has no ':' after its title"),
        ("Intro\n####A: it is sweet\n####B:......", "step 1 has text after its title"),
        ("Intro\n####A:......\nsome words\n####B:......", "text between step titles"),
    ],
)
def test_failure_reasons(text: str, reason: str) -> None:
    with pytest.raises(PlanFormatError) as info:
        parse_plan(text)
    assert str(info.value).startswith(reason)
    assert isinstance(info.value, ValueError)


def test_limits_come_from_arguments() -> None:
    text = _plan_text("A", "B", "C")
    with pytest.raises(PlanFormatError, match=r"too many steps \(3 > 2\)"):
        parse_plan(text, max_branches=2)
    with pytest.raises(PlanFormatError, match=r"title too long \(5 > 4 chars\)"):
        parse_plan(_plan_text("Taste", "B"), max_title_chars=4)
    assert parse_plan(_plan_text("Tast", "B"), max_title_chars=4).titles == ["Tast", "B"]


@pytest.mark.parametrize(("kwargs"), [{"max_branches": 1}, {"max_title_chars": 0}])
def test_bad_limits_are_caller_errors(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be an integer") as info:
        parse_plan(GOOD, **kwargs)
    assert not isinstance(info.value, PlanFormatError)


@pytest.mark.parametrize(
    "titles",
    [
        ("Goût 🍵", "Koffein ☕", "价格"),
        ("מחיר", "طعم", "Цена"),  # right-to-left scripts and Cyrillic
        ("\u202eTaste", "Caf\u200dfeine"),  # bidi override and zero-width joiner
        ("👨‍👩‍👧 family", "🏳️‍🌈 flag"),  # multi-code-point emoji
    ],
)
def test_unicode_titles_survive(titles: tuple[str, ...]) -> None:
    assert parse_plan(_plan_text(*titles)).titles == list(titles)


def test_fake_markers_in_surrounding_text() -> None:
    # A user question quoting the format ends up in the preamble: rejected, not misparsed.
    with pytest.raises(PlanFormatError, match="preamble contains"):
        parse_plan("You asked about '####A:......' lines.\n####A:......\n####B:......")
    # A marker-like run inside a title is caught by the title rules.
    with pytest.raises(PlanFormatError, match="contains '####'"):
        parse_plan("Intro\n########A:......\n####B:......")
    # Percent signs after the closing marker do not create an extra step.
    assert parse_plan("Intro\n####A:......\n####B:......\n####%%%%%%%%\n####C:").titles == [
        "A",
        "B",
    ]


def test_non_string_input_is_a_format_error() -> None:
    with pytest.raises(PlanFormatError, match="must be a string"):
        parse_plan(None)  # type: ignore[arg-type]


# Arbitrary text biased towards the format's own pieces, so that near-plans are common.
_FRAGMENTS = ["#", "####", "####%%%%", ":", "......", "\n", " ", "%", "\r", "\u2026", "A", "a"]
_ANY_TEXT = st.lists(
    st.one_of(
        st.sampled_from(_FRAGMENTS),
        st.text(max_size=6),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),  # lone surrogates
    ),
    max_size=40,
).map("".join)
# Line-structured near-plans: mostly title lines with odd titles and placeholders.
_TITLE_LINE = st.builds(
    lambda indent, title, tail: f"{indent}####{title}:{tail}",
    st.sampled_from(["", " ", "\t"]),
    st.one_of(
        st.sampled_from(["A", "a", "B", " ", "", "x" * 25, "####", "C:D"]), st.text(max_size=8)
    ),
    st.sampled_from(["......", "", ".", " ...... ", "\u2026", " text", ":......"]),
)
_PLANISH = st.builds(
    lambda preamble, lines, end: "\n".join([preamble, *lines]) + end,
    st.one_of(st.just("Intro."), _ANY_TEXT),
    st.lists(st.one_of(_TITLE_LINE, _TITLE_LINE, _ANY_TEXT), max_size=7),
    st.sampled_from(["\n####%%%%", "####%%%%", "", "\n####%%%%\n####Z: text"]),
)


@settings(max_examples=600, deadline=None)
@given(st.one_of(_ANY_TEXT, _PLANISH))
def test_any_text_gives_plan_or_format_error(text: str) -> None:
    reason = None
    result = None
    try:
        result = parse_plan(text, max_branches=4, max_title_chars=20)
    except PlanFormatError as exc:  # anything else fails the test
        reason = str(exc)
    if result is None:
        assert reason
    else:
        assert isinstance(result, Plan)
        assert 2 <= len(result.titles) <= 4


@settings(max_examples=200, deadline=None)
@given(
    preamble=st.text(st.characters(blacklist_characters="#\n"), max_size=50),
    titles=st.lists(
        st.text(st.characters(blacklist_characters="#:\n"), min_size=1, max_size=20).filter(
            lambda t: t.strip() and not is_placeholder_title(t)
        ),
        min_size=2,
        max_size=6,
        unique_by=lambda t: t.strip().casefold(),
    ),
)
def test_format_then_parse_round_trips(preamble: str, titles: list[str]) -> None:
    plan = Plan(preamble=preamble, titles=titles)
    assert parse_plan(format_plan(plan)) == plan


def test_repair_drops_duplicates_empties_and_placeholders() -> None:
    text = _plan_text("Taste", "taste", "Step 3", "1", "Price", "Title", "Caffeine")
    assert parse_plan(text).titles == ["Taste", "Price", "Caffeine"]
    assert repair_titles(["Taste", " TASTE", "", "Step 1", "Price"]) == (
        ["Taste", "Price"],
        ["TASTE", "", "Step 1"],
    )


@pytest.mark.parametrize(
    "title", ["Title", "Step 1", "step 2.", "1", "3)", "...", "Part A", "Items", "Conclusion"]
)
def test_placeholder_titles(title: str) -> None:
    assert is_placeholder_title(title)


@pytest.mark.parametrize("title", ["Taste", "DC", "Price range", "Steps to take", "Points of view"])
def test_titles_that_name_something(title: str) -> None:
    assert not is_placeholder_title(title)


def test_format_plan_is_the_canonical_text() -> None:
    plan = Plan(
        preamble="Let me look at each drink in turn.", titles=["Taste", "Caffeine", "Price"]
    )
    assert format_plan(plan) + "\n" == GOOD
    assert format_plan(Plan(titles=["A", "B"])) == "####A:......\n####B:......\n####%%%%"


def test_space_class_matches_python_whitespace() -> None:
    # The grammar keeps these off a title's ends so that strip() cannot change a title.
    spaces = {c for c in range(sys.maxunicode + 1) if chr(c).isspace()}
    covered: set[int] = set()
    text = plan_module._SPACE_CLASS.encode().decode("unicode_escape")
    i = 0
    while i < len(text):
        if i + 2 < len(text) and text[i + 1] == "-":
            covered |= set(range(ord(text[i]), ord(text[i + 2]) + 1))
            i += 3
        else:
            covered.add(ord(text[i]))
            i += 1
    assert covered == spaces


def test_grammar_text_shape() -> None:
    ebnf = plan_grammar_ebnf(5, max_title_chars=30, max_preamble_chars=100)
    assert ebnf.startswith('root ::= preamble "\\n" step{2,5} "####%%%%"\n')
    assert 'step ::= "####" title ":......\\n"' in ebnf


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_branches": 1},
        {"max_branches": 4, "max_title_chars": 0},
        {"max_branches": 4, "max_preamble_chars": 0},
        {"max_branches": True},
    ],
)
def test_grammar_rejects_bad_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be an integer"):
        plan_grammar_ebnf(**kwargs)
