"""Check steps: when the given titles are records of the user's material, each step opens with
its record's own words and is one line long, on every entry point; otherwise nothing changes."""

from __future__ import annotations

import pytest

from langchain_parallel_reason.pipeline import PipelineConfig, StepDelta, drive, iter_answer
from langchain_parallel_reason.pipeline.render import record_quote, record_titles

RECORDS = (
    "Here are the records.\n1. Name: Ann Lee; GPA: 3.10\n2) Name: Bo Kim; GPA: 2.90\n\n"
    "Question: Who has the higher GPA?"
)


def test_records_are_titles_found_above_the_question() -> None:
    assert record_titles(RECORDS, ["Ann Lee", "Bo Kim"])
    assert not record_titles(RECORDS, ["Ann Lee", "Cy Day"])  # one is not a record
    assert not record_titles(RECORDS, ["GPA", "higher"])  # "higher" is only in the question
    assert not record_titles("Compare tea and coffee on taste and price.", ["Taste", "Price"])
    assert not record_titles(RECORDS, [])
    assert record_quote(RECORDS, "Ann Lee") == "Name: Ann Lee"  # the list number dropped
    assert record_quote(RECORDS, "Bo Kim") == "Name: Bo Kim"


@pytest.mark.parametrize("mode", ["parallel", "stepped"])
def test_check_steps_open_with_their_record_and_end_at_the_line(
    tiny_llama, tiny_tokenizer, mode
) -> None:
    messages = [{"role": "user", "content": RECORDS}]
    config = PipelineConfig(mode=mode, steps=("Ann Lee", "Bo Kim"), max_tokens=90)
    events: list = []
    result = drive(iter_answer(tiny_llama, tiny_tokenizer, messages, config), events)
    report = result.report
    assert report.mode_used == mode, report.fallback_reason
    assert report.step_kind == "check"
    for b, title in enumerate(("Ann Lee", "Bo Kim")):
        streamed = "".join(e.text for e in events if isinstance(e, StepDelta) and e.step == b)
        assert streamed.startswith(f"Name: {title}")
        assert "\n" not in streamed.strip()
        assert f"**{title}**: {streamed.strip()}" in result.content
    # The conclusion picks one of the checked items, and stays on one line.
    conclusion = result.content.rsplit("\n\n", 1)[-1]
    assert conclusion.startswith(("Ann Lee", "Bo Kim")), conclusion
    assert "\n" not in conclusion.strip()


def test_paragraph_steps_are_reported_as_such(tiny_llama, tiny_tokenizer) -> None:
    messages = [{"role": "user", "content": "Compare tea and coffee."}]
    config = PipelineConfig(steps=("Taste", "Price"), max_tokens=60)
    result = drive(iter_answer(tiny_llama, tiny_tokenizer, messages, config), [])
    assert result.report.step_kind == "paragraph"
    sequential = drive(
        iter_answer(tiny_llama, tiny_tokenizer, messages, PipelineConfig(mode="sequential")), []
    )
    assert sequential.report.step_kind is None
