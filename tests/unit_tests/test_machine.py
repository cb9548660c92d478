"""The request machine's contract: actions out, events in, the stop rules held on fed tokens.

Two drivers: a scripted one (the test feeds chosen tokens) and ``LocalDriver``, which executes
every ``Decode`` on a tiny model in this process, one branch after another with the decoder's
own ``iter_decode``: the machine knows nothing of the backend, and answers as ``pipeline.answer``
does on the same model.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
import torch
from transformers.cache_utils import DynamicCache

from langchain_parallel_reason.decoding.sampling import SamplingParams, SuppressFirst
from langchain_parallel_reason.decoding.sequential import forward_tokens, iter_decode
from langchain_parallel_reason.pipeline import (
    FallbackEvent,
    OutputGrammar,
    PipelineConfig,
    PlanEvent,
    answer,
)
from langchain_parallel_reason.pipeline.actions import (
    BackendInfo,
    Cancel,
    Choose,
    Decode,
    Done,
    Emit,
    Ended,
    Failed,
    Scores,
    Tokens,
)
from langchain_parallel_reason.pipeline.backend import LocalBackend
from langchain_parallel_reason.pipeline.machine import RequestMachine

MESSAGES = [{"role": "user", "content": "Compare tea and coffee."}]
PLAIN = tuple(range(40, 120))  # plain tokens of the tiny vocabulary: never EOS, no loop


class LocalDriver:
    """Runs a machine on a transformers model: each branch of a ``Decode`` is its own
    ``iter_decode`` from an empty cache, fed to the machine one token at a time."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tok = model, tokenizer
        local = LocalBackend(model, tokenizer)
        self.info = BackendInfo(
            "local driver", local.context_window, local.stop_ids, local.vocab_size,
            grammar=local.grammar,
        )  # fmt: skip

    def run(self, machine: RequestMachine) -> tuple[list[Any], Any]:
        """Every action the machine returned, and its result."""
        seen: list[Any] = []
        streams: dict[tuple[int, int], Generator] = {}
        scores: list[Scores] = []
        actions = machine.start()
        while True:
            for action in actions:
                seen.append(action)
                if isinstance(action, Decode):
                    for b in range(len(action.branch_prefixes)):
                        streams[action.op, b] = self._branch(action, b)
                elif isinstance(action, Cancel):
                    streams.pop((action.op, action.branch)).close()
                elif isinstance(action, Choose):
                    scores.append(self._scores(action))
                elif isinstance(action, Done):
                    assert not streams, "Done with a stream still open"
                    return seen, action.result
            if scores:
                actions = machine.feed(scores.pop())
                continue
            (op, b), stream = next(iter(streams.items()))
            try:
                actions = machine.feed(Tokens(op, b, (next(stream),)))
            except StopIteration as stop:
                del streams[op, b]
                actions = machine.feed(Ended(op, b, stop.value.finish_reason))

    def _branch(self, decode: Decode, b: int) -> Generator[int, None, Any]:
        s = decode.settings
        suppress = s.suppress
        if s.opening_banned_ids is not None:  # per branch, as iter_decode_branches bans them
            base = suppress or SuppressFirst((), 0)
            suppress = SuppressFirst(base.token_ids, base.count, s.opening_banned_ids[b])
        return iter_decode(
            self.model,
            [*decode.context_ids, *decode.branch_prefixes[b]],
            DynamicCache(),
            start=0,
            max_new_tokens=decode.budgets[b],
            params=s.params or SamplingParams(),
            seed=decode.seeds[b],
            stop_token_ids=s.stop_token_ids,
            stop_strings=s.stop_strings,
            tokenizer=self.tok,
            suppress=suppress,
            constraint=s.constraint,
            jump_forward=s.jump_forward,
            repetition=s.repetition,
            context_ids=s.repetition_context,
            loop_guard=s.loop_guard,
        )

    def _scores(self, choose: Choose) -> Scores:
        with torch.inference_mode():
            ids = torch.tensor(choose.context_ids)
            logprobs = torch.log_softmax(forward_tokens(self.model, ids, DynamicCache(), 0), -1)
        return Scores(choose.op, {i: float(logprobs[i]) for i in choose.choice_ids})


def _scripted(tok: Any, config: PipelineConfig) -> RequestMachine:
    info = BackendInfo("scripted", 2048, [tok.eos_token_id], len(tok))
    return RequestMachine(info, tok, MESSAGES, config)


def _only(actions: list[Any], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def test_start_asks_the_router_first_in_auto_mode(tiny_tokenizer: Any) -> None:
    actions = _scripted(tiny_tokenizer, PipelineConfig()).start()
    assert len(actions) == 1
    assert isinstance(actions[0], Choose)
    assert len(actions[0].choice_ids) >= 2  # the first tokens of yes and of no


def test_start_of_a_sequential_answer_is_one_decode(tiny_tokenizer: Any) -> None:
    (decode,) = _scripted(tiny_tokenizer, PipelineConfig(mode="sequential", max_tokens=9)).start()
    assert isinstance(decode, Decode)
    assert decode.branch_prefixes == ((),)
    assert decode.budgets == (9,)
    assert decode.settings.loop_guard
    assert tiny_tokenizer.eos_token_id in decode.settings.stop_token_ids


def test_the_budget_cancels_a_branch_fed_past_it(tiny_tokenizer: Any) -> None:
    machine = _scripted(tiny_tokenizer, PipelineConfig(mode="sequential", max_tokens=6))
    (decode,) = machine.start()
    actions = machine.feed(Tokens(decode.op, 0, PLAIN[:10]))
    assert _only(actions, Cancel) == [Cancel(decode.op, 0)]
    assert isinstance(actions[-1], Done)
    assert machine.done
    assert machine.result.output_tokens == 6
    assert machine.result.finish_reason == "length"


def test_the_loop_guard_cancels_a_looping_branch(tiny_tokenizer: Any) -> None:
    machine = _scripted(tiny_tokenizer, PipelineConfig(mode="sequential", max_tokens=200))
    (decode,) = machine.start()
    actions = machine.feed(Tokens(decode.op, 0, PLAIN[:5] * 30))
    assert _only(actions, Cancel) == [Cancel(decode.op, 0)]
    assert machine.result.output_tokens < 150  # ended by the guard, not the budget
    assert any("repeat" in note for note in machine.result.report.notes)


def test_a_stop_string_cancels_the_branch(tiny_tokenizer: Any) -> None:
    config = PipelineConfig(mode="sequential", max_tokens=50, stop=("DONE",))
    machine = _scripted(tiny_tokenizer, config)
    (decode,) = machine.start()
    ids = (*PLAIN[:4], *tiny_tokenizer.encode(" DONE and more", add_special_tokens=False))
    actions = machine.feed(Tokens(decode.op, 0, ids))
    assert _only(actions, Cancel) == [Cancel(decode.op, 0)]
    assert "DONE" not in machine.result.content
    assert machine.result.finish_reason == "stop"


def test_a_branch_that_ends_itself_is_not_cancelled(tiny_tokenizer: Any) -> None:
    machine = _scripted(tiny_tokenizer, PipelineConfig(mode="sequential", max_tokens=50))
    (decode,) = machine.start()
    assert not _only(machine.feed(Tokens(decode.op, 0, PLAIN[:3])), Cancel)
    actions = machine.feed(Ended(decode.op, 0, "length"))
    assert not _only(actions, Cancel)
    assert isinstance(actions[-1], Done)
    assert machine.result.output_tokens == 3


def test_feeding_after_done_or_before_start_is_an_error(tiny_tokenizer: Any) -> None:
    machine = _scripted(tiny_tokenizer, PipelineConfig(mode="sequential", max_tokens=2))
    with pytest.raises(RuntimeError, match="start"):
        machine.feed(Tokens(0, 0, (40,)))
    (decode,) = machine.start()
    machine.feed(Tokens(decode.op, 0, PLAIN[:2]))
    with pytest.raises(RuntimeError, match="done"):
        machine.feed(Tokens(decode.op, 0, (40,)))
    with pytest.raises(TypeError, match="Tokens"):
        machine.feed("tokens")  # type: ignore[arg-type]


def test_failed_steps_cancel_the_others_and_fall_back(tiny_tokenizer: Any) -> None:
    config = PipelineConfig(steps=("Tea", "Coffee"), max_tokens=80, step_max_tokens=8)
    machine = _scripted(tiny_tokenizer, config)
    plan, steps = machine.start()
    assert isinstance(plan, Emit)
    assert isinstance(plan.event, PlanEvent)
    assert isinstance(steps, Decode)
    assert len(steps.branch_prefixes) == 2
    actions = machine.feed(Failed(steps.op, RuntimeError("the stream broke")))
    assert _only(actions, Cancel) == [Cancel(steps.op, 0), Cancel(steps.op, 1)]
    fallback = [a.event for a in _only(actions, Emit) if isinstance(a.event, FallbackEvent)]
    assert "the stream broke" in fallback[0].reason
    (again,) = _only(actions, Decode)
    assert again.branch_prefixes == ((),)  # the sequential answer
    # What the closed streams sent before they closed is ignored.
    assert machine.feed(Tokens(steps.op, 1, PLAIN[:3])) == []
    with pytest.raises(TypeError, match="Tokens or Ended"):
        machine.feed(Scores(again.op, {}))


def test_a_failed_sequential_decode_raises_its_error(tiny_tokenizer: Any) -> None:
    machine = _scripted(tiny_tokenizer, PipelineConfig(mode="sequential", max_tokens=8))
    (decode,) = machine.start()
    with pytest.raises(ConnectionError, match="gone"):
        machine.feed(Failed(decode.op, ConnectionError("server gone")))
    assert machine.done


def test_close_abandons_the_request(tiny_tokenizer: Any) -> None:
    machine = _scripted(tiny_tokenizer, PipelineConfig(mode="sequential", max_tokens=8))
    machine.start()
    machine.close()
    assert machine.done
    assert machine.result is None


@pytest.mark.parametrize(
    "config",
    [
        PipelineConfig(mode="sequential", max_tokens=24),
        PipelineConfig(max_tokens=120, step_max_tokens=10),  # the router decides
        PipelineConfig(
            mode="parallel", steps=("Taste", "Price"), max_tokens=80, step_max_tokens=10
        ),
        PipelineConfig(mode="stepped", steps=("Taste", "Price"), max_tokens=80, step_max_tokens=10),
        PipelineConfig(mode="parallel", max_tokens=160, step_max_tokens=10),  # an own plan
        PipelineConfig(
            mode="sequential",
            max_tokens=40,
            grammar=OutputGrammar(
                json_schema='{"type":"object","properties":{"a":{"type":"integer"}}}'
            ),
        ),
    ],
    ids=["sequential", "auto", "steps", "stepped", "plan", "json"],
)
def test_done_carries_what_answer_returns(tiny_llama: Any, tiny_tokenizer: Any, config) -> None:
    driver = LocalDriver(tiny_llama, tiny_tokenizer)
    seen, result = driver.run(RequestMachine(driver.info, tiny_tokenizer, MESSAGES, config))
    expected = answer(tiny_llama, tiny_tokenizer, MESSAGES, config)
    assert result.content == expected.content
    assert (result.finish_reason, result.input_tokens, result.output_tokens) == (
        expected.finish_reason,
        expected.input_tokens,
        expected.output_tokens,
    )
    # What a backend does not decide (how it ran, how long it took) aside, the reports agree.
    aside = {"timings", "attention", "decode_steps", "tokens_per_forward", "blocks"}
    assert result.report.model_dump(exclude=aside) == expected.report.model_dump(exclude=aside)
    assert [a.event for a in _only(seen, Emit)][-1] is not None
