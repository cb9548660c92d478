"""One request's pipeline as a state machine: fed what a backend produced, it answers with
what the backend must do next. No threads, no I/O.

Contract: ``RequestMachine(info, tokenizer, messages, config)``; ``start()`` and ``feed(event)``
return a list of actions (``Emit``, ``Decode``, ``Cancel``, ``Choose``, ``Done``); the driver
executes them and feeds back ``Tokens``, ``Ended``, ``Scores`` or ``Failed`` (all in
``pipeline.actions``). The stages are ``iter_answer``'s, run in a greenlet over a backend whose
operations are these actions; the stop rules (``decoding.stops.Stopping``: stop ids and strings, the loop guard), the budgets and
the min_tokens floor are applied here to the fed tokens, so they hold on every backend. A cache
is the list of ids a later decode sends as its context (a server's prefix cache keeps their KV;
an in-process driver keeps a KV cache per sequence and replays the stages' feeds and crops).
An error the pipeline does not recover from is raised by ``start``/``feed``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Generator, Sequence
from typing import Any

import greenlet
import torch

from ..decoding.decoder import BranchesOutput, BranchResult, StepEvent
from ..decoding.repetition import RepetitionControl
from ..decoding.sampling import make_generator, sample_next
from ..decoding.sequential import Cancelled, SequentialResult
from ..decoding.stops import Stopping
from .actions import (
    Action,
    BackendInfo,
    Cancel,
    Choose,
    Decode,
    Decoded,
    DecodeSettings,
    Done,
    Emit,
    Ended,
    Failed,
    Grammar,
    LaidOut,
    LayOut,
    MachineEvent,
    Scores,
    TokenCache,
    Tokens,
)
from .events import AnswerResult
from .render import DistinctTitles, newline_token_ids, step_opening_banned_ids

__all__ = ["RequestMachine"]


class RequestMachine:
    """``iter_answer`` for one request, as actions and events (see the module docstring)."""

    def __init__(
        self,
        info: BackendInfo,
        tokenizer: Any,
        messages: list[dict[str, Any]],
        config: Any,
        *,
        tools: list[dict[str, Any]] | None = None,
        cancel: Any = None,
    ) -> None:
        self.info = info
        backend = _Backend(self, info, tokenizer)
        self._args = (backend, tokenizer, messages, config, tools, cancel)
        self._glet = greenlet.greenlet(self._run)
        self._out: list[Action] = []
        self._ops = itertools.count()
        self._started = False
        self.result: AnswerResult | None = None
        """The answer once ``Done`` was returned (None before)."""

    @property
    def done(self) -> bool:
        """Whether the request ended (``Done`` returned, or an error raised)."""
        return self._glet.dead

    def start(self) -> list[Action]:
        """The first actions (raises the pipeline's error of a bad request)."""
        if self._started:
            raise RuntimeError("RequestMachine.start() was called already: feed() it events")
        self._started = True
        return self._resume(None)

    def feed(self, event: MachineEvent) -> list[Action]:
        """The actions that follow ``event`` (an event of a finished operation is ignored)."""
        if not isinstance(event, Tokens | Ended | Scores | Decoded | LaidOut | Failed):
            kinds = "Tokens, Ended, Scores, Decoded, LaidOut or Failed"
            raise TypeError(f"feed() takes {kinds}, not {event!r}")
        if not self._started or self.done:
            state = "has not started: call start() first" if not self._started else "is done"
            raise RuntimeError(f"the request machine {state}; it takes no more events")
        return self._resume(event)

    def close(self) -> None:
        """Abandon the request: the pipeline's ``finally`` blocks run; no actions follow."""
        if self._started and not self.done:
            self._glet.parent = greenlet.getcurrent()
            self._glet.throw(greenlet.GreenletExit)
        self._out.clear()

    def _resume(self, value: Any) -> list[Action]:
        # The driver may run on any greenlet of this thread (an engine's own coroutines).
        self._glet.parent = greenlet.getcurrent()
        self._glet.switch(value)
        actions, self._out = self._out, []
        return actions

    def _run(self, _: Any) -> None:
        # Looked up at run time: ``pipeline.iter_answer`` is the one seam for every backend.
        from .. import pipeline

        backend, tokenizer, messages, config, tools, cancel = self._args
        events = pipeline.iter_answer(
            backend, tokenizer, messages, config, tools=tools, cancel=cancel
        )
        while True:
            try:
                event = next(events)
            except StopIteration as stop:
                self.result = stop.value
                self._out.append(Done(stop.value))
                return
            self._out.append(Emit(event))

    def _issue(self, make: Callable[[int], Action]) -> int:
        op = next(self._ops)
        self._out.append(make(op))
        return op

    def _wait(self, op: int, kinds: tuple[type, ...]) -> Any:
        """The next event of ``op`` (switching out to the driver), one of ``kinds``; raises a
        ``Failed``'s error."""
        while True:
            event = self._glet.parent.switch()
            if event.op != op:
                continue  # what a closed stream sent before it closed
            if isinstance(event, Failed):
                raise event.error
            if not isinstance(event, kinds):
                names = " or ".join(k.__name__ for k in kinds)
                raise TypeError(f"operation {op} is answered with {names}, not {event!r}")
            return event


class _Backend:
    """``pipeline.backend.Backend`` whose operations are the machine's actions."""

    device = torch.device("cpu")

    def __init__(self, machine: RequestMachine, info: BackendInfo, tokenizer: Any) -> None:
        self.m, self.info, self.tokenizer = machine, info, tokenizer
        self.name, self.context_window = info.name, info.context_window
        self.stop_ids, self.vocab_size = list(info.stop_ids), info.vocab_size
        self.longer_context = info.longer_context
        self._keys = itertools.count(1)

    def new_cache(self) -> TokenCache:
        """An empty sequence."""
        return TokenCache(key=next(self._keys))

    def forward_tokens(self, ids: Sequence[int], cache: TokenCache, start: int) -> None:
        """Append ``ids`` (the backend computes them with the next decode)."""
        ids = [int(i) for i in ids]
        cache.ids[start:] = ids
        cache.replay.append(("feed", start, tuple(ids)))

    def crop(self, cache: TokenCache, length: int) -> None:
        """Keep the first ``length`` ids."""
        del cache.ids[length:]
        cache.replay.append(("crop", length))
        cache.branch_rows = []

    def grammar(self, *, ebnf: str | None = None, json_schema: Any = None, **kw: Any) -> Any:
        """``BackendInfo.grammar``'s constraint, or a ``Grammar`` the backend enforces."""
        if self.info.grammar is not None:
            return self.info.grammar(ebnf=ebnf, json_schema=json_schema, **kw)
        if isinstance(json_schema, str):
            json_schema = json.loads(json_schema)
        return Grammar(ebnf, json_schema)

    def kv_reuse_problem(self) -> str | None:
        """``BackendInfo.kv_reuse_problem`` (a server prefills the laid-out steps itself)."""
        return self.info.kv_reuse_problem

    def lay_out_branches(
        self, cache: TokenCache, kvs: Any, glue_ids: Any, cancel: Any = None
    ) -> tuple[int, None]:
        """A ``LayOut`` of the steps' KV (from ``Decoded``) after ``cache``; returns the row's
        length (the driver keeps the logits after it for the next decode)."""
        if (problem := self.kv_reuse_problem()) is not None:
            raise NotImplementedError(problem)
        rows = cache.branch_rows
        if len(rows) != len(kvs):
            raise RuntimeError(f"{len(kvs)} steps' KV to lay out, {len(rows)} decoded with it")
        row = list(cache.ids)
        for ids, kv, glue in zip(rows, kvs, glue_ids, strict=True):
            row += [*ids[: kv[0][0].shape[-2]], *(int(i) for i in glue)]
        glue = tuple(tuple(int(i) for i in g) for g in glue_ids)
        replay = tuple(cache.replay)
        op = self.m._issue(lambda op: LayOut(op, cache.key, replay, kvs, glue))
        cache.replay.clear()
        cache.branch_rows = []
        self.m._wait(op, (LaidOut,))
        cache.ids[:] = row
        return len(row), None

    def iter_decode(
        self, input_ids: Sequence[int], cache: TokenCache, *, start: int, **kw: Any
    ) -> Generator[int, None, SequentialResult]:
        """One continuation of ``cache.ids[:start] + input_ids`` (as ``iter_decode``)."""
        context = [*cache.ids[:start], *(int(i) for i in input_ids)]
        constraint = kw.get("constraint")
        if getattr(constraint, "choice_ids", None):
            token = self._choose(context, constraint, kw)
            yield token
            cache.ids[:] = context
            return SequentialResult([token], "stop", None, 1)
        if isinstance(constraint, DistinctTitles) and self.info.grammar is None:
            result = yield from self._distinct_plan(context, cache, start, kw, constraint)
        else:
            decode = self._decode(context, [[]], kw, [kw.get("seed")], cache, start)
            out = yield from _tokens(decode)
            branch = out.branches[0]
            result = SequentialResult(
                branch.token_ids, branch.finish_reason, branch.stop, out.forward_passes
            )
        cache.ids[:] = [*context, *result.token_ids[:-1]]  # as a KV cache: the last never fed
        return result

    def _distinct_plan(self, context, cache, start, kw, rule) -> Generator:
        """A plan under ``DistinctTitles`` on a backend that runs only its grammar (a server):
        the rule is applied to the tokens fed back (a greedy token is the argmax the local rule
        looks at). A title that opens with an earlier title's first token closes the list
        (its stream is cancelled and ``%%%%`` written after the ``####``), or, before the
        second title, is banned: the plan goes on from its text so far under the grammar of
        the rest (``rule.rest``), with those first tokens banned for the rest of the plan (a
        logit bias: a server cannot ban them at title starts only)."""
        track = DistinctTitles(None, self.tokenizer)
        tokens: list[int] = []
        budget, passes = int(kw["max_new_tokens"]), 0
        seg = dict(kw, constraint=rule.inner)
        while True:
            decode = self._decode([*context, *tokens], [[]], seg, [kw.get("seed")], cache, start)
            verdict, first = "ok", len(tokens)
            try:
                while verdict == "ok":
                    try:
                        _, token = next(decode)
                    except StopIteration as stop:
                        out = stop.value.branches[0]
                        passes += stop.value.forward_passes
                        return SequentialResult(tokens, out.finish_reason, out.stop, passes)
                    verdict = track.verdict(token)
                    if verdict == "ban" and rule.rest is None:
                        verdict = "ok"  # no grammar to go on under: the token stands
                    if verdict == "ok":
                        track.advance(token)
                        tokens.append(token)
                        yield token
            finally:
                decode.close()  # a cut stream is cancelled
            passes += len(tokens) - first + 1
            if verdict == "close":
                for token in track.close_tail_ids()[: budget - len(tokens)]:
                    tokens.append(token)
                    yield token
                if isinstance(rule.inner, Grammar):
                    rule.inner.completed = True
                return SequentialResult(tokens, "stop", None, passes)
            if len(tokens) >= budget:
                return SequentialResult(tokens, "length", None, passes)
            grammar = rule.rest(len(track.firsts))
            seg = dict(
                kw,
                constraint=None if grammar is None else Grammar(grammar),
                repetition=(kw.get("repetition") or RepetitionControl()).banning_ids(track.firsts),
                max_new_tokens=budget - len(tokens),
            )

    def iter_decode_branches(
        self, prefix_ids: Sequence[int], branch_prefixes: Sequence[Sequence[int]], **kw: Any
    ) -> Generator[StepEvent, None, BranchesOutput]:
        """All branches at once (as ``iter_decode_branches``); branch b samples with seed + b."""
        seed = kw.get("seed")
        seeds = [None if seed is None else seed + b for b in range(len(branch_prefixes))]
        prefix = list(prefix_ids)
        branches = [list(p) for p in branch_prefixes]
        cache = kw.get("prefix_cache")
        gen = self._decode(prefix, branches, kw, seeds, cache, len(prefix) if cache else 0)
        step = 0
        while True:
            try:
                b, token = next(gen)
            except StopIteration as stop:
                return stop.value
            yield StepEvent(step, (b,), (token,))
            step += 1

    def _decode(self, context, branches, kw, seeds, cache, start) -> Generator:
        """Issue a ``Decode`` after ``cache`` (None: a fresh one); yield ``(branch, token)`` as
        fed; ``Cancel`` a branch that must end; return the ``BranchesOutput`` (with a
        ``Decoded``'s counts and KV where the driver fed one)."""
        n = len(branches)
        budget = kw["max_new_tokens"]
        budgets = [budget] * n if isinstance(budget, int) else list(budget)
        stopping = Stopping.build(
            kw.get("stop_token_ids", ()),
            kw.get("stop_strings", ()),
            self.tokenizer,
            kw.get("loop_guard", False),
        )
        settings = self._settings(kw)
        floor, cancel = settings.min_tokens, kw.get("cancel")
        decode = (tuple(context), tuple(map(tuple, branches)), tuple(budgets), tuple(seeds))
        if cache is None:
            cache = self.new_cache()
        replay = tuple(cache.replay)
        cache.replay.clear()
        op = self.m._issue(lambda op: Decode(op, *decode, settings, cache.key, replay, start))
        decoded: Any = None  # a Decoded's output
        tokens: list[list[int]] = [[] for _ in range(n)]
        ends: list[tuple[str, Any] | None] = [None] * n
        try:
            # A driver that reports its decodes is waited for: its decoder's counts and KV.
            wait_decoded = self.info.reports_decodes
            while any(end is None for end in ends) or (wait_decoded and decoded is None):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("decoding cancelled")
                event = self.m._wait(op, (Tokens, Ended, Decoded))
                if isinstance(event, Decoded):
                    decoded = event.output
                    continue
                b = event.branch
                if ends[b] is not None:
                    continue  # tokens the backend sent before it saw the Cancel
                if isinstance(event, Ended):
                    ends[b] = ("length" if event.reason == "length" else "stop", None)
                    continue
                for token in event.ids:
                    tokens[b].append(token)
                    yield b, token
                    # Before min_tokens a server checks no stop (it bans EOS and stop ids
                    # meanwhile): neither does the machine.
                    end = stopping.check(tokens[b]) if len(tokens[b]) > floor else None
                    if end is None and len(tokens[b]) >= budgets[b]:
                        end = ("length", None)  # the machine holds the budget, whatever the backend
                    if end is not None:
                        ends[b] = end
                        self.m._out.append(Cancel(op, b))
                        break
        finally:
            # Leaving early (an error, a fallback, the request closed): no stream stays open.
            self.m._out.extend(Cancel(op, b) for b in range(n) if ends[b] is None)
        results = [
            BranchResult(tokens[b], ends[b][0], len(tokens[b]), ends[b][1]) for b in range(n)
        ]
        if isinstance(settings.grammar, Grammar):  # a backend ends a finished grammar with EOS
            settings.grammar.completed = results[0].finish_reason == "stop"
        total = sum(len(t) for t in tokens)
        if settings.keep_kv:
            cache.branch_rows += [[*branches[b], *tokens[b]] for b in range(n)]
        if decoded is not None:  # an in-process decoder's own counts, and its KV
            out = decoded.forward_passes, getattr(decoded, "kv_bytes", 0)
            attention = getattr(decoded, "attention", self.name)
            kept = getattr(decoded, "branch_kv", None)
            return BranchesOutput(results, *out, attention, total, kept)
        # The backend decodes the branches in one batch: about one pass per token of the longest.
        passes = max((len(t) for t in tokens), default=0)
        return BranchesOutput(results, passes, 0, self.name, total)

    def _settings(self, kw: dict[str, Any]) -> DecodeSettings:
        # A paragraph step's opening bans (the placeholder, a marker, a newline) are what a
        # server turns into the opening regex; a check step or a conclusion bans other ids.
        suppress = kw.get("suppress")
        step = (
            suppress is not None
            and suppress.count > 0
            and set(step_opening_banned_ids(self.tokenizer)) <= set(suppress.token_ids)
        )
        opening = kw.get("opening_banned_ids")
        # Per branch, its first token's bans: whether they keep it from ending the line.
        firsts = opening if opening is not None else [suppress.first_ids] if suppress else []
        newlines = set(newline_token_ids(self.tokenizer))
        goes_on = tuple(bool(f) and newlines <= set(f) for f in firsts)
        return DecodeSettings(
            params=kw.get("params"),
            stop_token_ids=tuple(kw.get("stop_token_ids", ())),
            stop_strings=tuple(kw.get("stop_strings", ())),
            suppress=suppress,
            opening_banned_ids=None if opening is None else tuple(map(tuple, opening)),
            repetition=kw.get("repetition"),
            repetition_context=tuple(kw.get("context_ids", ())),
            constraint=kw.get("constraint"),
            jump_forward=bool(kw.get("jump_forward", False)),
            loop_guard=bool(kw.get("loop_guard", False)),
            step_opening=step,
            line_goes_on=goes_on if any(goes_on) else (),
            attention=str(kw.get("attention", "auto")),
            keep_kv=bool(kw.get("keep_kv", False)),
        )

    def _choose(self, context: list[int], constraint: Any, kw: dict[str, Any]) -> int:
        """One token among ``constraint.choice_ids``, sampled here from the fed
        log-probabilities of those tokens with the caller's settings."""
        choices = tuple(int(i) for i in constraint.choice_ids)
        op = self.m._issue(lambda op: Choose(op, tuple(context), choices))
        event = self.m._wait(op, (Scores,))
        logits = event.logits
        if logits is None:
            logits = torch.full((self.vocab_size,), float("-inf"))
            for token, score in event.logprobs.items():
                if 0 <= token < self.vocab_size:
                    logits[token] = score
        logits = constraint.mask_logits(logits)
        params = kw.get("params")
        gen = (
            None
            if params is None or params.greedy
            else make_generator(kw.get("seed"), logits.device)
        )
        token = int(sample_next(logits[None], params, gen)[0]) if params else int(logits.argmax())
        constraint.advance(token)
        return token


def _tokens(gen: Generator) -> Generator[int, None, Any]:
    """The tokens of a one-branch ``_decode``; returns its result."""
    while True:
        try:
            _, token = next(gen)
        except StopIteration as stop:
            return stop.value
        yield token
