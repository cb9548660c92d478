"""The in-process transport for request machines: a ``pipeline.machine.RequestMachine``'s actions
run on a model in this process (the engine's view, which batches forwards across requests); no
stage logic.

Contract: ``LocalDriver(backend, tokenizer, cancel).run(machine, emit)`` runs the machine to its
``Done`` and returns the answer. It keeps one KV cache per sequence the stages opened
(``Decode.cache``) and repeats on it the stages' own feeds and crops (``Decode.replay``), so its
forwards are the ones the stages make on ``LocalBackend`` directly: the engine's prefix cache
serves the same prefills and the text is the same token for token. A ``Decode`` of one branch
without forced ids runs ``LocalBackend.iter_decode``, any other the belt-mask decoder
(``iter_decode_branches``); each token is fed as ``Tokens``, a branch the decoder ended as
``Ended``, the decoder's result as ``Decoded``. ``Cancel`` ends that branch in the decoder at
once (sent into its generator: nothing more is decoded for it). ``Choose`` runs the router's
forward and feeds its logits row in ``Scores`` (the machine samples it as the local decoder
would); ``LayOut`` lays the steps' KV out (``decoding.merge``); ``Emit`` goes to ``emit``. An
operation that raises is fed back as ``Failed``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Generator
from typing import Any

from ..decoding.sequential import Cancelled
from ..pipeline.actions import (
    Action,
    BackendInfo,
    Cancel,
    Choose,
    Decode,
    Decoded,
    Done,
    Emit,
    Ended,
    Failed,
    LaidOut,
    LayOut,
    MachineEvent,
    Scores,
    Tokens,
)
from ..pipeline.backend import LocalBackend
from ..pipeline.events import AnswerResult, Event
from ..pipeline.machine import RequestMachine

__all__ = ["LocalDriver"]


class _Seq:
    """One sequence's KV cache, and the logits after its last token where they are known."""

    __slots__ = ("kv", "logits")

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.logits: Any = None


class LocalDriver:
    """Runs one request machine on a ``LocalBackend`` (see the module docstring).

    Args:
        backend: the stages' operations on the model (or an engine's view of it).
        tokenizer: the request's tokenizer (the machine's).
        cancel: an event that cancels the request (checked by the decoders before each forward).
        kv_reuse_problem: ``backend.kv_reuse_problem()``, when the caller knows it already.
    """

    def __init__(
        self,
        backend: LocalBackend,
        tokenizer: Any,
        cancel: Any = None,
        kv_reuse_problem: str | bool | None = False,
    ) -> None:
        self.backend, self.tok, self.cancel = backend, tokenizer, cancel
        if kv_reuse_problem is False:
            kv_reuse_problem = backend.kv_reuse_problem()
        self.info = BackendInfo(
            name=backend.name,
            context_window=backend.context_window,
            stop_ids=list(backend.stop_ids),
            vocab_size=backend.vocab_size,
            longer_context=backend.longer_context,
            grammar=backend.grammar,
            kv_reuse_problem=kv_reuse_problem,
            reports_decodes=True,
        )
        """What the machine's stages need to know of the model."""
        self._seqs: dict[int, _Seq] = {}

    def run(self, machine: RequestMachine, emit: Callable[[Event], None]) -> AnswerResult:
        """Execute ``machine``'s actions until ``Done``; returns its result. Errors are the
        machine's (the pipeline's, e.g. ``PipelineCancelled``)."""
        todo: collections.deque[Action] = collections.deque(machine.start())
        try:
            while True:
                if not todo:
                    raise RuntimeError("the request machine waits for nothing and is not done")
                action = todo.popleft()
                if isinstance(action, Emit):
                    emit(action.event)
                elif isinstance(action, Done):
                    return action.result
                elif isinstance(action, Decode):
                    todo.extend(self._decode(machine, action, emit))
                elif isinstance(action, Choose):
                    todo.extend(self._answer(machine, action.op, self._scores, action))
                elif isinstance(action, LayOut):
                    todo.extend(self._answer(machine, action.op, self._lay_out, action))
                # A Cancel met here is of a decode that is over already.
        finally:
            machine.close()
            self._seqs.clear()  # the KV of every sequence

    # -- operations -------------------------------------------------------------------------

    def _answer(self, machine: RequestMachine, op: int, work: Callable, action: Any) -> list:
        try:
            event: MachineEvent = work(action)
        except Exception as e:
            event = Failed(op, e)
        return machine.feed(event)

    def _seq(self, key: int, replay: tuple[tuple[Any, ...], ...]) -> _Seq:
        """Sequence ``key``'s cache after the stages' feeds and crops since its last decode."""
        seq = self._seqs.get(key)
        if seq is None:
            seq = self._seqs[key] = _Seq(self.backend.new_cache())
        for step in replay:
            if step[0] == "crop":
                self.backend.crop(seq.kv, step[1])
                seq.logits = None
            elif step[2]:
                seq.logits = self.backend.forward_tokens(step[2], seq.kv, step[1])
        return seq

    def _scores(self, choose: Choose) -> Scores:
        """The router's one forward over its own cache, as ``iter_decode`` runs it."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("decoding cancelled")
        logits = self.backend.forward_tokens(choose.context_ids, self.backend.new_cache(), 0)
        return Scores(choose.op, {i: float(logits[i]) for i in choose.choice_ids}, logits)

    def _lay_out(self, lay: LayOut) -> LaidOut:
        seq = self._seq(lay.cache, lay.replay)
        glue = [list(g) for g in lay.glue_ids]
        _, seq.logits = self.backend.lay_out_branches(seq.kv, lay.kvs, glue, self.cancel)
        return LaidOut(lay.op)

    def _open(self, d: Decode) -> tuple[Generator, bool]:
        """The decoder for ``d`` and whether it is one continuation (``iter_decode``)."""
        seq = self._seq(d.cache, d.replay)
        s = d.settings
        context = list(d.context_ids)
        start = len(context) if d.start < 0 else d.start
        kw: dict[str, Any] = {
            "seed": d.seeds[0],  # the decoders seed branch b with seed + b, as the machine
            "stop_token_ids": s.stop_token_ids,
            "stop_strings": s.stop_strings,
            "tokenizer": self.tok,
            "suppress": s.suppress,
            "repetition": s.repetition,
            "loop_guard": s.loop_guard,
            "cancel": self.cancel,
        }
        if s.params is not None:
            kw["params"] = s.params
        logits, seq.logits = seq.logits if start == len(context) else None, None
        if len(d.branch_prefixes) == 1 and not d.branch_prefixes[0]:
            gen = self.backend.iter_decode(
                context[start:],
                seq.kv,
                start=start,
                max_new_tokens=d.budgets[0],
                constraint=s.constraint,
                jump_forward=s.jump_forward,
                context_ids=s.repetition_context,
                logits=logits,
                **kw,
            )
            return gen, True
        opening = s.opening_banned_ids
        gen = self.backend.iter_decode_branches(
            context,
            [list(p) for p in d.branch_prefixes],
            max_new_tokens=list(d.budgets),
            opening_banned_ids=None if opening is None else [list(o) for o in opening],
            prefix_cache=seq.kv if start else None,
            prefix_logits=logits,
            attention=s.attention,
            keep_kv=s.keep_kv,
            **kw,
        )
        return gen, False

    def _decode(self, machine: RequestMachine, d: Decode, emit: Callable) -> list[Action]:
        """Run decode ``d`` to its end, feeding the machine as it goes; returns the actions
        that follow it."""
        try:
            gen, single = self._open(d)
        except Exception as e:
            return machine.feed(Failed(d.op, e))
        live = set(range(len(d.branch_prefixes)))  # branches the machine still listens to
        closing: set[int] = set()  # branches the machine cancelled, for the decoder to end
        later: list[Action] = []  # what the machine asked for after this decode

        def feed(event: MachineEvent) -> None:
            for action in machine.feed(event):
                if later or not isinstance(action, Emit | Cancel):
                    later.append(action)
                elif isinstance(action, Emit):
                    emit(action.event)
                elif action.op == d.op and action.branch in live:
                    live.discard(action.branch)
                    closing.add(action.branch)

        try:
            while True:
                # A cancelled branch ends in the decoder before it decodes again.
                sent: Any = (True if single else set(closing)) if closing else None
                closing.clear()
                try:
                    step = gen.send(sent)
                except StopIteration as stop:
                    output = stop.value
                    break
                except Exception as e:
                    feed(Failed(d.op, e))
                    return later
                if single:
                    pairs, ended = [(0, step)], ()
                else:
                    pairs, ended = zip(step.branch_ids, step.token_ids, strict=True), step.finished
                for b, token in pairs:
                    if b in live:
                        feed(Tokens(d.op, b, (int(token),)))
                for b, reason in ended:
                    if b in live:
                        live.discard(b)
                        feed(Ended(d.op, b, reason))
                if later:  # the machine left the decode (an error it recovers from)
                    return later
                if not live:  # every branch ended or was cancelled: the decoder returns
                    closing |= set(range(len(d.branch_prefixes)))
        finally:
            gen.close()  # a decode left early restores its cache (decoding's finally blocks)
        if single and 0 in live:  # the decoder ended by itself (its grammar was complete)
            live.discard(0)
            feed(Ended(d.op, 0, output.finish_reason))
        feed(Decoded(d.op, output))
        return later
