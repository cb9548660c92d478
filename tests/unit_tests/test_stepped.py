"""Mode "stepped" (the paper's baseline) and Stage 3 over reused KV, on tiny random models.

The stepped invariant: every forward pass of a stepped answer sees exactly the causal context of
the sequence it ends up laying out, so its logits equal those of ONE plain forward over that
sequence, position by position (greedy fp32): the answer is an ordinary decoding of its own
laid-out text. Both modes give the same answer on every entry point (pipeline, engine, chat
model sync and async, stream and batch).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import build_tiny_model

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.pipeline import (
    ContentDelta,
    PipelineConfig,
    StepDelta,
    answer,
    drive,
    iter_answer,
)
from langchain_parallel_reason.runtime.base import Request
from langchain_parallel_reason.runtime.engine import Engine

MESSAGES = [{"role": "user", "content": "Compare tea and coffee."}]
STEPS = ("Taste", "Price", "Caffeine")
# Steps that are records of the message: check steps (a quote after the header, one line).
RECORDS = [
    {
        "role": "user",
        "content": "1. Name: Ann Lee; GPA: 3.10\n2. Name: Bo Kim; GPA: 2.90\n"
        "Question: Who has the higher GPA?",
    }
]
NAMES = ("Ann Lee", "Bo Kim")
# A random model writes a valid plan only with room for it (its titles are noise).
OWN_PLAN = {"max_tokens": 400, "step_max_tokens": 8, "plan_max_tokens": 250, "max_branches": 3}


def _collect(model, tok, config):
    events: list = []
    return events, drive(iter_answer(model, tok, MESSAGES, config), events)


def _record_forwards(model):
    """Hook recording (positions, ids, last-row logits) of every forward of ``model``."""
    seen: list[tuple[list[int], list[int], torch.Tensor]] = []

    def hook(_module, _args, kwargs, output):
        pos = kwargs["position_ids"][0].tolist()
        ids = kwargs["input_ids"][0].tolist()
        seen.append((pos, ids, output.logits[0, -1].detach().clone()))

    return seen, model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(
    ("config", "messages"),
    [
        (PipelineConfig(mode="stepped", steps=STEPS, max_tokens=80, step_max_tokens=10), MESSAGES),
        (PipelineConfig(mode="stepped", **OWN_PLAN), MESSAGES),
        (
            PipelineConfig(
                mode="stepped", steps=STEPS, max_tokens=80, step_max_tokens=10, stop=("e",)
            ),
            MESSAGES,
        ),
        (PipelineConfig(mode="stepped", steps=NAMES, max_tokens=80, step_max_tokens=10), RECORDS),
    ],
    ids=["given-steps", "own-plan", "stop-string", "check-steps"],
)
def test_stepped_is_an_ordinary_decoding_of_its_own_sequence(
    tiny_tokenizer, config, messages
) -> None:
    model = build_tiny_model("llama", seed=0)
    seen, handle = _record_forwards(model)
    try:
        result = answer(model, tiny_tokenizer, messages, config)
    finally:
        handle.remove()
    assert result.report.mode_used == "stepped", result.report.fallback_reason
    # Replay the cache: each forward starts where its positions start (after any crop).
    cache: list[int] = []
    contexts = []
    for pos, ids, _ in seen:
        assert pos == list(range(pos[0], pos[0] + len(ids)))  # positions are cache indices
        cache = cache[: pos[0]] + ids
        contexts.append(list(cache))
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([cache])).logits[0]  # [T, V], one plain forward
    checked = 0
    for (pos, _, logits), context in zip(seen, contexts, strict=True):
        if context == cache[: len(context)]:  # not a token later cropped (a stop marker)
            # Logits reach about 10 here; a wrong context moves them by about 1.
            torch.testing.assert_close(logits, full[pos[-1]], atol=1e-3, rtol=1e-4)
            checked += 1
    assert checked >= sum(result.report.branch_tokens) + result.report.conclusion_tokens - 3


def test_stepped_report_and_first_step_equal_to_the_parallel_branch(tiny_llama, tiny_tokenizer):
    stepped_cfg = PipelineConfig(mode="stepped", steps=STEPS, max_tokens=80, step_max_tokens=10)
    events, result = _collect(tiny_llama, tiny_tokenizer, stepped_cfg)
    report = result.report
    assert report.mode_used == "stepped"
    assert report.steps == list(STEPS)
    assert report.fallback_reason is None
    assert len(report.branch_tokens) == 3
    assert all(0 < t <= 10 for t in report.branch_tokens)
    assert report.decode_steps == sum(report.branch_tokens)
    assert report.tokens_per_forward == 1.0
    assert report.conclusion_kv is None
    assert {"steps", "merge", "conclusion", "total"} <= set(report.timings)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == result.content
    first = "".join(e.text for e in events if isinstance(e, StepDelta) and e.step == 0)
    # Step 1 sees the prompt, the plan and its header in both modes: the same text.
    parallel = answer(tiny_llama, tiny_tokenizer, MESSAGES, PipelineConfig(**{
        **stepped_cfg.__dict__, "mode": "parallel"}))  # fmt: skip
    assert parallel.content.startswith(f"**{STEPS[0]}**: {first.strip()}\n\n")
    assert parallel.report.branch_tokens[0] == report.branch_tokens[0]


def test_stepped_plans_like_parallel_and_falls_back_the_same_way(tiny_llama, tiny_tokenizer):
    own = OWN_PLAN
    stepped = answer(tiny_llama, tiny_tokenizer, MESSAGES, PipelineConfig(mode="stepped", **own))
    parallel = answer(tiny_llama, tiny_tokenizer, MESSAGES, PipelineConfig(mode="parallel", **own))
    assert stepped.report.mode_used == "stepped"
    assert stepped.report.steps == parallel.report.steps  # the same greedy plan
    assert stepped.report.plan_attempts == parallel.report.plan_attempts
    tight = PipelineConfig(mode="stepped", steps=STEPS, max_tokens=20)
    fallback = answer(tiny_llama, tiny_tokenizer, MESSAGES, tight)
    assert fallback.report.mode_used == "sequential"
    assert "budget too small" in fallback.report.fallback_reason


def _key(result: Any) -> tuple[Any, ...]:
    r = result.report
    return result.content, result.output_tokens, r.mode_used, tuple(r.branch_tokens), r.notes


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "stepped"},
        {"mode": "stepped", "temperature": 0.8, "seed": 3},
        {"mode": "parallel", "conclusion_kv": "reuse"},
        {"mode": "parallel", "conclusion_kv": "reuse", "attention": "mask"},
    ],
    ids=["stepped", "stepped-sampled", "reuse", "reuse-mask"],
)
async def test_every_entry_point_gives_the_pipelines_answer(tiny_llama, tiny_tokenizer, settings):
    budgets = {"max_tokens": 60, "step_max_tokens": 10}
    config = PipelineConfig(steps=STEPS, **budgets, **settings)
    reference = answer(tiny_llama, tiny_tokenizer, MESSAGES, config)
    assert reference.report.mode_used == settings["mode"]
    engine = Engine(tiny_llama, tiny_tokenizer)
    try:
        *_, (kind, via_engine) = engine.stream(Request(MESSAGES, config))
    finally:
        engine.close()
    assert kind == "done"
    assert _key(via_engine) == _key(reference)

    chat = ChatParallelReason.from_model(
        tiny_llama, tiny_tokenizer, steps=list(STEPS), **budgets, **settings
    )
    question = MESSAGES[0]["content"]
    invoked = chat.invoke(question)
    streamed = "".join(str(c.content) for c in chat.stream(question))
    batched = chat.batch([question, question])
    ainvoked = await chat.ainvoke(question)
    astreamed = "".join([str(c.content) async for c in chat.astream(question)])
    for content in (invoked.content, streamed, *(m.content for m in batched), ainvoked.content):
        assert content == reference.content
    assert astreamed == reference.content
    meta = invoked.response_metadata["parallel"]
    assert meta["mode_used"] == settings["mode"]
    assert meta["branch_tokens"] == reference.report.branch_tokens
    assert invoked.usage_metadata["output_tokens"] == reference.output_tokens


@pytest.mark.parametrize(("messages", "steps"), [(MESSAGES, STEPS), (RECORDS, NAMES)])
def test_reuse_keeps_stage_2_and_gives_a_valid_conclusion(
    tiny_llama, tiny_tokenizer, messages, steps
):
    base = {"steps": steps, "max_tokens": 80, "step_max_tokens": 10}
    events: list = []
    reuse = drive(
        iter_answer(
            tiny_llama, tiny_tokenizer, messages, PipelineConfig(conclusion_kv="reuse", **base)
        ),
        events,
    )
    reprefill = answer(tiny_llama, tiny_tokenizer, messages, PipelineConfig(**base))
    r = reuse.report
    assert r.mode_used == "parallel"
    assert r.conclusion_kv == "reuse", r.notes
    assert reprefill.report.conclusion_kv == "reprefill"
    assert r.notes == []
    assert {"steps", "merge", "conclusion", "total"} <= set(r.timings)
    assert r.timings["merge"] <= r.timings["conclusion"]
    # Stage 2 is the same; only the conclusion may differ.
    assert r.branch_tokens == reprefill.report.branch_tokens
    steps_md = reprefill.content[
        : len(reprefill.content) - len(reprefill.content.split("\n\n")[-1])
    ]
    assert reuse.content.startswith(steps_md)
    assert 0 < r.conclusion_tokens <= 80 - sum(r.branch_tokens)
    assert reuse.output_tokens == sum(r.branch_tokens) + r.conclusion_tokens
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == reuse.content
    # Both Stage-2 backends keep the same KV, so the same answer.
    mask = answer(tiny_llama, tiny_tokenizer, messages, PipelineConfig(
        conclusion_kv="reuse", attention="mask", **base))  # fmt: skip
    assert mask.content == reuse.content


def test_reuse_on_a_model_it_cannot_serve_re_prefills_with_a_note(tiny_model, tiny_tokenizer):
    model = tiny_model("gemma2", attn_implementation="eager")
    base = {"steps": STEPS, "max_tokens": 80, "step_max_tokens": 10}
    reuse = answer(model, tiny_tokenizer, MESSAGES, PipelineConfig(conclusion_kv="reuse", **base))
    plain = answer(model, tiny_tokenizer, MESSAGES, PipelineConfig(**base))
    assert reuse.report.conclusion_kv == "reprefill"
    assert any("conclusion_kv='reuse' unavailable" in n for n in reuse.report.notes)
    assert reuse.content == plain.content


def test_chat_model_validates_the_new_options(tiny_llama, tiny_tokenizer) -> None:
    chat = ChatParallelReason.from_model(tiny_llama, tiny_tokenizer, max_tokens=40)
    with pytest.raises(ValueError, match="conclusion_kv"):
        chat.invoke("hi", conclusion_kv="sometimes")
    with pytest.raises(ValueError, match="mode"):
        chat.invoke("hi", mode="stepwise")
    with pytest.raises(ValueError, match="conclusion_kv"):
        PipelineConfig(conclusion_kv="never")


@pytest.mark.parametrize("mode", ["parallel", "stepped"])
def test_the_steps_stream_as_one_chunk_before_the_conclusion(chat, mode) -> None:
    # bench tasks scores the conclusion as the content after that chunk.
    chunks = [c.content for c in chat.stream("Compare tea and coffee.", mode=mode, steps=STEPS)]
    contents = [c for c in chunks if c]
    first = contents[0]
    assert first.startswith(f"**{STEPS[0]}**: ")
    assert all(f"\n\n**{title}**: " in first for title in STEPS[1:])
    assert first.endswith("\n\n")
    assert len(contents) > 1  # then the conclusion
