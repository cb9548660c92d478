"""Check steps: when the given titles are records of the user's material, each step opens with
its record's own words and is one line long, on every entry point; otherwise nothing changes."""

from __future__ import annotations

import pytest

from langchain_parallel_reason.pipeline import PipelineConfig, StepDelta, drive, iter_answer
from langchain_parallel_reason.pipeline.render import record_quote, record_titles
from langchain_parallel_reason.pipeline.steps import picked_record

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
    # The conclusion is one of the checked items, picked (decoded), then its record quoted.
    conclusion = result.content.rsplit("\n\n", 1)[-1]
    assert conclusion in ("Ann Lee; GPA: 3.10", "Bo Kim; GPA: 2.90"), conclusion
    picked = conclusion.split(";")[0]
    assert report.conclusion_tokens == len(tiny_tokenizer.encode(picked, add_special_tokens=False))


def test_the_picked_record_is_the_rest_of_its_line_or_a_full_stop() -> None:
    picks = ("Ann Lee", "Bo Kim")
    assert picked_record(RECORDS, picks, "Bo Kim") == "; GPA: 2.90"
    assert picked_record(RECORDS, picks, " Ann Lee ") == "; GPA: 3.10"
    assert picked_record("1. Ann Lee\n2. Bo Kim\nWho?", picks, "Bo Kim") == "."  # title ends it
    assert picked_record(RECORDS, picks, "Ann") == ""  # not a pick: nothing is quoted
    assert picked_record(RECORDS, picks, "") == ""


def test_paragraph_steps_are_reported_as_such(tiny_llama, tiny_tokenizer) -> None:
    messages = [{"role": "user", "content": "Compare tea and coffee."}]
    config = PipelineConfig(steps=("Taste", "Price"), max_tokens=60)
    result = drive(iter_answer(tiny_llama, tiny_tokenizer, messages, config), [])
    assert result.report.step_kind == "paragraph"
    sequential = drive(
        iter_answer(tiny_llama, tiny_tokenizer, messages, PipelineConfig(mode="sequential")), []
    )
    assert sequential.report.step_kind is None


def _newline_first_model(tokenizer):
    """A private tiny Llama whose every next token is a newline unless that is banned (then
    "x"): logits come from the head's bias alone."""
    import torch
    from tiny_models import build_tiny_model

    model = build_tiny_model("llama", attn_implementation="sdpa")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.encode("\n", add_special_tokens=False)[0]] = 10.0
        head.bias[tokenizer.encode("x", add_special_tokens=False)[0]] = 5.0
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model


ENDS_AT_TITLE = "Records:\n1. Name: Ann Lee; GPA: 3.10\n2. Bo Kim\n\nQuestion: Who is first?"


@pytest.mark.parametrize("mode", ["parallel", "stepped"])
def test_a_check_step_whose_record_goes_on_never_ends_at_once(tiny_tokenizer, mode) -> None:
    model = _newline_first_model(tiny_tokenizer)
    messages = [{"role": "user", "content": ENDS_AT_TITLE}]
    config = PipelineConfig(mode=mode, steps=("Ann Lee", "Bo Kim"), max_tokens=60)
    events: list = []
    result = drive(iter_answer(model, tiny_tokenizer, messages, config), events)
    assert result.report.mode_used == mode, result.report.fallback_reason
    texts = [
        "".join(e.text for e in events if isinstance(e, StepDelta) and e.step == b) for b in (0, 1)
    ]
    # Ann Lee's record goes on ("; GPA: 3.10"): her check writes at least one token ("x")
    # before the line ends; Bo Kim's line ends at his name, so his check may end at once.
    assert texts[0].strip().startswith("Name: Ann Lee")
    assert texts[0].strip() != "Name: Ann Lee"
    assert result.report.branch_tokens[0] >= 2
    assert result.report.branch_tokens[1] == 1


def test_a_server_gets_the_line_rule_per_branch(tiny_tokenizer) -> None:
    import httpx

    from langchain_parallel_reason.pipeline.actions import Decode, DecodeSettings
    from langchain_parallel_reason.pipeline.render import newline_token_ids
    from langchain_parallel_reason.runtime.http import LINE_GOES_ON_REGEX, HttpDriver
    from langchain_parallel_reason.runtime.server import ServerInfo

    info = ServerInfo("http://127.0.0.1:9/v1", "m", ["m"], "vllm", 4096, None)
    driver = HttpDriver(httpx.AsyncClient(), info, tiny_tokenizer)
    newlines = set(newline_token_ids(tiny_tokenizer))
    # A check step ends at the line's end: the newline ids become stop ids, banned for the
    # first token by min_tokens (the server's own first-token ban), and no grammar runs.
    settings = DecodeSettings(stop_token_ids=(0,), stop_strings=("\n",), line_goes_on=(True, False))
    bodies = driver._bodies(Decode(0, (1, 2), ((3,), (4,)), (8, 8), (0, 1), settings))
    assert newlines
    assert newlines | {0} == set(bodies[0]["stop_token_ids"])
    assert bodies[0]["min_tokens"] == 1
    assert "structured_outputs" not in bodies[0]
    assert bodies[1]["stop_token_ids"] == [0]
    assert "min_tokens" not in bodies[1]
    # A branch that goes on past the line gets the rule as a regex instead.
    settings = DecodeSettings(line_goes_on=(True, False))
    bodies = driver._bodies(Decode(0, (1, 2), ((3,), (4,)), (8, 8), (0, 1), settings))
    assert bodies[0]["structured_outputs"] == {"regex": LINE_GOES_ON_REGEX}
    assert "structured_outputs" not in bodies[1]


def test_a_server_gets_at_most_four_stop_strings_the_machine_checks_all(tiny_tokenizer) -> None:
    import httpx

    from langchain_parallel_reason.pipeline.actions import Decode, DecodeSettings
    from langchain_parallel_reason.runtime.http import SERVER_STOP_STRINGS, HttpDriver
    from langchain_parallel_reason.runtime.server import ServerInfo

    info = ServerInfo("http://127.0.0.1:9/v1", "m", ["m"], "vllm", 4096, None)
    driver = HttpDriver(httpx.AsyncClient(), info, tiny_tokenizer)
    stops = tuple(f"stop {i}" for i in range(7))
    body = driver._bodies(Decode(0, (1,), ((),), (8,), (0,), DecodeSettings(stop_strings=stops)))[0]
    assert body["stop"] == list(stops[:SERVER_STOP_STRINGS])
    assert SERVER_STOP_STRINGS == 4  # vLLM answers 400 past OpenAI's limit


@pytest.mark.parametrize("mode", ["parallel", "stepped"])
def test_a_check_may_write_its_record_and_a_little_more(tiny_tokenizer, mode) -> None:
    # A check that runs far past its record checks nothing, and in parallel the longest step
    # holds Stage 2 up: each check's budget is its record's rest of line plus a slack.
    from langchain_parallel_reason.pipeline.actions import BackendInfo, Decode
    from langchain_parallel_reason.pipeline.machine import RequestMachine
    from langchain_parallel_reason.pipeline.settings import CHECK_SLACK_TOKENS

    info = BackendInfo("scripted", 2048, [tiny_tokenizer.eos_token_id], len(tiny_tokenizer))
    messages = [{"role": "user", "content": RECORDS}]
    config = PipelineConfig(
        mode=mode, steps=("Ann Lee", "Bo Kim"), max_tokens=200, step_max_tokens=40
    )
    (decode,) = [
        a
        for a in RequestMachine(info, tiny_tokenizer, messages, config).start()
        if isinstance(a, Decode)
    ]
    rest = len(tiny_tokenizer.encode("; GPA: 3.10", add_special_tokens=False))
    cap = rest + CHECK_SLACK_TOKENS
    assert cap < 40
    assert decode.budgets[0] == cap  # the first step (stepped: the only one decoding now)
    if mode == "parallel":
        assert decode.budgets == (cap, cap)  # both records have the same rest's length
    # Paragraph steps keep step_max_tokens.
    para = PipelineConfig(mode=mode, steps=("Taste", "Price"), max_tokens=200, step_max_tokens=40)
    machine = RequestMachine(info, tiny_tokenizer, [{"role": "user", "content": "Tea?"}], para)
    (decode,) = [a for a in machine.start() if isinstance(a, Decode)]
    assert set(decode.budgets) == {40}
