"""One behaviour suite, run on both backends: the embedded SmolLM2-135M in process, and the
same model served by a real vLLM server (CPU build, float32) on 127.0.0.1.

Each behaviour of the method is written once (``pipeline/``); these tests show it holds on
every backend: the router with its reason, the loop guard, repetition controls, the
conclusion's minimum, stepped mode, fallbacks, several blocks, timeouts, streaming equal to
invoke, and a report with the same keys, all filled, both ways. Greedy decoding throughout.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.bench.task_gen import generate_task
from langchain_parallel_reason.pipeline import MIN_CONCLUSION_TOKENS
from langchain_parallel_reason.pipeline.render import record_rest
from langchain_parallel_reason.prompts import echo_words

pytestmark = [pytest.mark.slow, pytest.mark.remote, pytest.mark.allow_hosts(["127.0.0.1"])]

ITEMS = [f"Item {i}" for i in range(1, 7)]
SIX = "Write one sentence about each item."


@pytest.fixture(params=["local", "remote"])
def make(request: pytest.FixtureRequest) -> Any:
    """Builds a chat model on the backend of this run (same fields either way)."""
    if request.param == "remote":
        server = request.getfixturevalue("server")

        def remote(**kw: Any) -> ChatParallelReason:
            return ChatParallelReason(base_url=server.base_url, model=server.model, **kw)

        return remote

    def local(**kw: Any) -> ChatParallelReason:
        return ChatParallelReason(dtype="float32", progress=False, **kw)

    return local


def _report(msg: Any) -> Any:
    return msg.response_metadata["parallel"]


def test_the_router_decides_and_says_why(make: Any) -> None:
    for bias, route, word in ((50.0, "plan", "yes"), (-50.0, "direct", "no")):
        msg = make(max_tokens=48, route_bias=bias).invoke("Compare tea and coffee.")
        report = _report(msg)
        assert report["route"] == route
        assert f"answered {word}" in report["route_reason"]
        assert "log-odds" in report["route_reason"]
        assert report["mode_used"] == ("sequential" if route == "direct" else report["mode_used"])


ANIMALS = ["Cat", "Dog", "Bird"]
LOOPING = "Write 'a cat is a cat' many times for each animal, without stopping."


def test_the_loop_guard_cuts_looping_steps(make: Any) -> None:
    # The 135M model loops on this one ("A cat is a cat. A cat is a cat. ..."), both ways.
    msg = make(steps=ANIMALS, step_max_tokens=48, max_tokens=400).invoke(LOOPING)
    report = _report(msg)
    reasons = report["branch_finish_reasons"]
    assert "repetition" in reasons, reasons
    for reason, tokens in zip(reasons, report["branch_tokens"], strict=True):
        if reason == "repetition":
            assert tokens < 48  # cut before the budget
    assert report["conclusion_tokens"] >= MIN_CONCLUSION_TOKENS


def test_a_plan_title_never_opens_like_an_earlier_one(make: Any) -> None:
    # The 135M model's own plan repeats its first title here ("####Quitting:...... ####Quit.."):
    # in process the rule masks logits; a server returns tokens, and the machine applies the
    # same rule to them (a repeat is banned and the plan goes on, or it closes the list).
    msg = make(max_tokens=160, mode="parallel").invoke("How do I quit smoking?")
    report = _report(msg)
    assert report["mode_used"] == "parallel", report["fallback_reason"]
    assert report["plan_attempts"] == 1
    titles = report["steps"]
    assert len(titles) >= 2
    openings = [title.split()[0].lower() for title in titles]
    assert len(set(openings)) == len(openings), titles


def test_the_report_has_the_same_keys_all_filled(make: Any) -> None:
    msg = make(steps=["Taste", "Price"], max_tokens=160).invoke("Compare tea and coffee.")
    report = _report(msg)
    assert report["mode_used"] == "parallel"
    assert report["route"] == "plan"
    assert report["route_reason"]
    assert len(report["blocks"]) == 1
    assert report["conclusion_tokens"] >= MIN_CONCLUSION_TOKENS
    assert len(report["branch_finish_reasons"]) == len(report["branch_tokens"]) == 2
    assert report["decode_steps"] == max(report["branch_tokens"])
    assert {"steps", "conclusion", "total"} <= set(report["timings"])
    local_keys = set(_report(_local_reference()).keys())
    assert set(report) == local_keys


def _local_reference() -> Any:
    return ChatParallelReason(
        dtype="float32", progress=False, steps=["Taste", "Price"], max_tokens=8
    ).invoke("Hi")


def test_repetition_penalty_is_honoured(make: Any) -> None:
    plain = make(mode="sequential", max_tokens=40).invoke("Describe the sea.")
    penalised = make(mode="sequential", max_tokens=40, repetition_penalty=1.8).invoke(
        "Describe the sea."
    )
    assert plain.content != penalised.content


def test_stepped_mode_writes_steps_one_after_another(make: Any) -> None:
    msg = make(steps=["Taste", "Price"], mode="stepped", max_tokens=160).invoke("Tea or coffee?")
    report = _report(msg)
    assert report["mode_used"] == "stepped"
    assert report["tokens_per_forward"] == 1.0
    assert msg.content.index("**Taste**") < msg.content.index("**Price**")


def test_too_small_a_budget_falls_back_and_says_why(make: Any) -> None:
    msg = make(steps=ITEMS, max_tokens=40).invoke(SIX)
    report = _report(msg)
    assert report["mode_used"] == "sequential"
    assert "budget too small" in report["fallback_reason"]
    assert msg.content.strip()


def test_blocks_never_exceed_max_blocks(make: Any) -> None:
    msg = make(mode="parallel", max_blocks=2, max_tokens=300).invoke(
        "Compare trains, buses and bicycles for a 10 km daily commute."
    )
    report = _report(msg)
    if report["mode_used"] == "parallel":
        assert 1 <= len(report["blocks"]) <= 2
    assert not any("runs one block" in note for note in report["notes"])


def test_a_timeout_raises_and_says_how_to_fix(make: Any) -> None:
    with pytest.raises(TimeoutError, match="timeout="):
        make(mode="sequential", max_tokens=400, timeout=0.3).invoke("Tell a long story.")


def test_closing_a_stream_early_ends_the_request(make: Any) -> None:
    # Run to its end, this answer takes several seconds on either backend; closed, well under 2.
    llm = make(steps=ITEMS, max_tokens=500, step_max_tokens=64, repetition_penalty=1.3)
    stream = llm.stream(SIX)
    next(stream)  # the request is running
    stream.close()  # cancels it: the engine's rows or the server's streams are freed
    engine = llm.get_engine()
    deadline = time.monotonic() + 1.5
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.stats()["running"] == 0


def test_stream_equals_invoke(make: Any) -> None:
    llm = make(steps=["Taste", "Price"], max_tokens=120)
    full = llm.invoke("Compare tea and coffee.")
    streamed = "".join(str(chunk.content) for chunk in llm.stream("Compare tea and coffee."))
    assert streamed == full.content


def test_the_prompt_example_never_reaches_an_answer(make: Any) -> None:
    # With nothing to say about "Item N", the 135M model wrote the Stage-1 prompt's worked
    # example into every step ("A rabbit needs room to hop ..."); its topic words are banned in
    # Stage 2 and 3 unless the caller's text uses them, on both backends.
    msg = make(steps=ITEMS, step_max_tokens=48).invoke(SIX)
    words = set(re.findall(r"[a-z]+", msg.content.casefold()))
    assert not words & {w.casefold() for w in echo_words(SIX, *ITEMS)}, msg.content
    # A question that names the example's topic keeps its words.
    msg = make(steps=["Rabbit", "Dog"], max_tokens=120).invoke("Is a rabbit or a dog a pet?")
    assert "rabbit" in msg.content.casefold()


def test_records_as_steps_are_one_line_checks(make: Any) -> None:
    task = generate_task("retrieval", 4, seed=0, index=0)
    msg = make(steps=list(task.steps), step_max_tokens=32, max_tokens=200).invoke(task.prompt)
    report = _report(msg)
    assert report["step_kind"] == "check"
    for title in task.steps:
        line = next(x for x in msg.content.splitlines() if x.startswith(f"**{title}**: "))
        assert line.startswith(f"**{title}**: Name: {title}")  # the record's own words
        assert "\n" not in line  # one line: the step ended at the line's end or its budget
        assert line != f"**{title}**: Name: {title}"  # its record goes on: so does the check
    # ... and a conclusion follows (its stop strings, one per title, are more than the 4 a
    # server takes: the machine checks the rest).
    assert report["conclusion_tokens"] > 0, report["notes"]
    assert not any("conclusion failed" in note for note in report["notes"]), report["notes"]
    # The conclusion is the item it picks, then that item's record quoted from the message
    # (nothing of the prompt's example after it).
    conclusion = msg.content.rsplit("\n\n", 1)[-1]
    picked = next((t for t in task.steps if conclusion.startswith(t)), None)
    assert picked is not None, msg.content
    assert conclusion == picked + record_rest(task.prompt, picked), msg.content


@pytest.mark.parametrize("mode", ["parallel", "stepped"])
def test_no_step_opens_with_the_placeholder(make: Any, mode: str) -> None:
    # Titles that open alike ("Item 1".."Item 6") left the server's stepped steps without their
    # opening rule: each copied the plan's placeholder ("......"). Both modes, both backends.
    msg = make(steps=ITEMS, step_max_tokens=24, mode=mode).invoke(SIX)
    for title in ITEMS:
        line = next(x for x in msg.content.splitlines() if x.startswith(f"**{title}**: "))
        assert not line.removeprefix(f"**{title}**: ").startswith("."), msg.content
