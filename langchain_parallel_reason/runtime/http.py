"""A server's transport for request machines (vLLM, SGLang): N streamed completions, close =
cancel; no stage logic.

Contract: ``HttpDriver(client, info, tokenizer).run(machine, emit)`` executes the actions of a
``pipeline.machine.RequestMachine`` on an OpenAI-compatible server until it is done, and
returns the answer. ``Decode`` is one streamed ``/v1/completions`` per branch, all sent at
once, with token-id prompts (the server sees exactly the ids the local engine would; the chat
template is rendered by the model's own tokenizer), and their token ids are fed back as they
are sampled; ``Cancel`` closes that stream, which aborts it on the server; ``Choose`` is one
completion with log-probabilities; ``Emit`` goes to ``emit``. The machine applies the stop
rules and budgets; the settings travel as the server's parameters (temperature, top_p, top_k,
seed + b per branch, repetition_penalty, bad_words, min_tokens for the first tokens' bans, a
grammar as structured output, the step-opening regex, dropped when the server refuses it).
Cancelling ``run`` closes every stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx

from ..pipeline.actions import (
    BackendInfo,
    Cancel,
    Choose,
    Decode,
    DecodeSettings,
    Done,
    Emit,
    Ended,
    Failed,
    Grammar,
    Scores,
    Tokens,
)
from ..pipeline.events import AnswerResult, Event
from ..pipeline.machine import RequestMachine
from ..pipeline.render import newline_token_ids, stop_token_ids
from .server import ServerError, ServerInfo, error_text, malformed, send_json, unreachable

__all__ = [
    "STEP_OPENING_REGEX",
    "HttpDriver",
]

# A step's opening, as the local decoder's first-token bans: right after the plan a small
# model tends to copy the placeholder ("......") or start the next title ("\n####..."), so the
# first character is a word character and the first 30 hold no "#" and no newline.
STEP_OPENING_REGEX = "[ ]?[^\\s#.\u2026]([^#\\n]{0,30}|[^#\\n]{30}[\\s\\S]*)"
# A check step whose record goes on after its title: its first character does not end the line
# (sent only where the branch does not end at the line's end, see ``_line_rule``).
LINE_GOES_ON_REGEX = "[^\\n][\\s\\S]*"
# Most stop strings an OpenAI-compatible completion takes.
SERVER_STOP_STRINGS = 4
# Server error texts that mean "this server cannot use the grammar or regex we sent".
GRAMMAR_WORDS = ("grammar", "structured", "guided", "ebnf", "xgrammar", "regex")


class HttpDriver:
    """Runs request machines on one server (see the module docstring)."""

    def __init__(self, client: httpx.AsyncClient, info: ServerInfo, tokenizer: Any) -> None:
        self.client = client
        self.info = info
        self.backend_info = BackendInfo(
            name=f"server ({info.kind or 'openai'}: concurrent requests, shared prefix cache)",
            context_window=info.max_model_len or 1 << 30,
            stop_ids=stop_token_ids(None, tokenizer),
            vocab_size=len(tokenizer),
            longer_context="start the server with a larger --max-model-len",
        )
        """What the machine's stages need to know of the server."""
        self.newline_ids = tuple(newline_token_ids(tokenizer))
        self.regex_ok = True  # False once the server refused the step-opening regex
        self.completions_running = 0
        self.notes: list[str] = []

    async def run(self, machine: RequestMachine, emit: Callable[[Event], None]) -> AnswerResult:
        """Execute ``machine``'s actions until ``Done``; returns its result with this driver's
        notes. Errors are the machine's (the pipeline's, the server's); cancelling closes
        every stream."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tasks: dict[tuple[int, int], asyncio.Future] = {}
        closing: list[asyncio.Future] = []
        actions = machine.start()
        try:
            while True:
                for action in actions:
                    if isinstance(action, Emit):
                        emit(action.event)
                    elif isinstance(action, Decode):
                        # The streams an earlier decode cancelled are closed first (the server
                        # has aborted them before it sees the next requests).
                        await asyncio.gather(*closing, return_exceptions=True)
                        closing.clear()
                        advice = self.info.cache_advice()
                        if len(action.branch_prefixes) > 1 and advice and advice not in self.notes:
                            self.notes.append(advice)
                        for b, body in enumerate(self._bodies(action)):
                            stream = self._stream(action.op, b, body, queue)
                            tasks[action.op, b] = asyncio.ensure_future(stream)
                    elif isinstance(action, Cancel):
                        if (task := tasks.pop((action.op, action.branch), None)) is not None:
                            task.cancel()  # closes the stream: the server aborts the request
                            closing.append(task)
                    elif isinstance(action, Choose):
                        tasks[action.op, -1] = asyncio.ensure_future(self._choose(action, queue))
                    elif isinstance(action, Done):
                        return self._noted(action.result)
                actions = machine.feed(await queue.get())
        finally:
            pending = [*tasks.values(), *closing]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            machine.close()

    def _noted(self, result: AnswerResult) -> AnswerResult:
        if not self.notes:
            return result
        notes = [*result.report.notes, *self.notes]
        return replace(result, report=result.report.model_copy(update={"notes": notes}))

    # -- request bodies ---------------------------------------------------------------------

    def _bodies(self, decode: Decode) -> list[dict[str, Any]]:
        """One completion body per branch of ``decode``."""
        context = list(decode.context_ids)
        goes_on = decode.settings.line_goes_on or (False,) * len(decode.branch_prefixes)
        return [
            self._body([*context, *forced], budget, seed, decode.settings, line)
            for forced, budget, seed, line in zip(
                decode.branch_prefixes, decode.budgets, decode.seeds, goes_on, strict=True
            )
        ]

    def _body(self, prompt, max_tokens, seed, settings: DecodeSettings, line=False) -> dict:
        params = settings.params
        body: dict[str, Any] = {
            "model": self.info.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": params.temperature if params else 0.0,
            "top_p": params.top_p if params else 1.0,
            "stream": True,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if params and params.top_k:
            body["top_k"] = params.top_k
        if seed is not None:
            body["seed"] = seed
        if settings.stop_token_ids:
            body["stop_token_ids"] = list(settings.stop_token_ids)
        if settings.stop_strings:
            # OpenAI's limit, which vLLM enforces (a 400 past it): the first ones go to the
            # server; the machine checks them all and cancels the stream at any of them.
            body["stop"] = list(settings.stop_strings)[:SERVER_STOP_STRINGS]
        if settings.min_tokens:
            body["min_tokens"] = settings.min_tokens  # the server bans EOS / stop ids that long
        repetition = settings.repetition
        if repetition is not None and repetition.penalty not in (None, 1.0):
            body["repetition_penalty"] = repetition.penalty
        if repetition is not None and repetition.bad_words:
            body["bad_words"] = list(repetition.bad_words)  # tokenized as the local ban is
        if repetition is not None and (single := repetition.single_token_bans()):
            body["logit_bias"] = {str(i): -100 for i in single}
        if repetition is not None and repetition.ngram_size:
            note = "no_repeat_ngram_size is not a server sampling parameter: not applied there"
            if note not in self.notes:
                self.notes.append(note)
        grammar = settings.grammar
        if isinstance(grammar, Grammar):
            body |= self._structured(ebnf=grammar.ebnf, schema=grammar.json_schema)
        elif settings.step_opening and self.regex_ok:
            body |= self._structured(regex=STEP_OPENING_REGEX)
        elif line:
            body |= self._line_rule(settings, body)
        return body

    def _line_rule(self, settings: DecodeSettings, body: dict[str, Any]) -> dict[str, Any]:
        """A branch whose first token may not end the line, as the server's parameters.

        A branch that ends at the line's end anyway (stop string "\\n": a check step) gets
        the newline-holding ids as stop ids with ``min_tokens`` >= 1: the server bans them
        (and EOS) for the first token, as the local first-token ban does, and afterwards ends
        the stream at the very token where the machine's "\\n" stop would cut it. This costs
        the server nothing per token, where a regex runs its grammar engine on every step
        (and it ends the stream on the server, without waiting for our cancel). Otherwise a
        regex says it.
        """
        if "\n" in settings.stop_strings:
            stops = list(dict.fromkeys([*body.get("stop_token_ids", ()), *self.newline_ids]))
            return {"stop_token_ids": stops, "min_tokens": max(1, body.get("min_tokens", 0))}
        return self._structured(regex=LINE_GOES_ON_REGEX) if self.regex_ok else {}

    def _structured(self, ebnf=None, schema=None, regex=None) -> dict[str, Any]:
        """The server's structured-output field for an EBNF grammar, a JSON schema or a regex."""
        if self.info.kind == "sglang":
            if regex is not None:
                return {"regex": regex}
            return {"ebnf": ebnf} if ebnf is not None else {"json_schema": json.dumps(schema)}
        # vLLM: the old guided_grammar / guided_json fields are accepted and silently ignored.
        if regex is not None:
            return {"structured_outputs": {"regex": regex}}
        key, value = ("grammar", ebnf) if ebnf is not None else ("json", schema)
        return {"structured_outputs": {key: value}}

    async def _choose(self, choose: Choose, queue: asyncio.Queue) -> None:
        """The server's log-probabilities of ``choose.choice_ids`` after its context."""
        body = self._body(list(choose.context_ids), 1, None, DecodeSettings()) | {
            "stream": False,
            "logprobs": 20,
            "allowed_token_ids": list(choose.choice_ids),
            "return_tokens_as_token_ids": True,
        }
        try:
            reply = await self.request("POST", "/completions", body)
            try:
                top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
                scores = {int(k.split(":")[-1]): float(v) for k, v in top.items()}
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                raise malformed(
                    self.info.base_url, "/completions", f"no token log-probabilities: {e}"
                ) from e
            await queue.put(Scores(choose.op, scores))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            await queue.put(Failed(choose.op, e))

    # -- HTTP -------------------------------------------------------------------------------

    async def request(self, method: str, endpoint: str, body: Any) -> dict[str, Any]:
        """One JSON request to ``base_url + endpoint``; errors name the server and the fix."""
        return await send_json(self.client, self.info.base_url, method, endpoint, body)

    async def _stream(self, op: int, b: int, body: dict[str, Any], queue: asyncio.Queue) -> None:
        """Stream one completion, putting ``Tokens``, then ``Ended`` or ``Failed``."""
        endpoint = "/completions"
        try:
            for attempt in range(2):
                try:
                    await self._read_stream(op, b, body, queue, endpoint)
                    return
                except ServerError as e:
                    refused = e.status == 400 and any(w in e.message.lower() for w in GRAMMAR_WORDS)
                    regex = "regex" in body or "regex" in body.get("structured_outputs", {})
                    if attempt or not refused or not regex:
                        raise
                    # The server cannot use the step-opening regex: steps go on without it.
                    self.regex_ok = False
                    self.notes.append(f"the server refused the step-opening regex ({e.message})")
                    body = {
                        k: v for k, v in body.items() if k not in ("structured_outputs", "regex")
                    }
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            await queue.put(Failed(op, e))

    async def _read_stream(self, op, b, body, queue, endpoint) -> None:
        url = self.info.base_url + endpoint
        try:
            async with self.client.stream("POST", url, json=body) as response:
                if response.status_code >= 400:
                    text = error_text((await response.aread()).decode(errors="replace"))
                    raise ServerError(response.status_code, text)
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    raise malformed(
                        self.info.base_url, endpoint, "a plain reply where a stream was asked for"
                    )
                self.completions_running += 1
                try:
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        await self._chunk(op, b, data, queue, endpoint)
                finally:
                    self.completions_running -= 1
        except httpx.TransportError as e:
            raise unreachable(self.info.base_url, e) from e

    async def _chunk(self, op: int, b: int, data: str, queue: asyncio.Queue, endpoint: str) -> None:
        try:
            chunk = json.loads(data)
            if not isinstance(chunk, dict):
                raise TypeError(f"a {type(chunk).__name__}, not an object")
            if "error" in chunk:  # an error after the stream started
                error = chunk["error"]
                raise ServerError(
                    200, str(error.get("message", error) if isinstance(error, dict) else error)
                )
            for choice in chunk.get("choices") or ():
                ids = choice.get("token_ids")
                if ids is None and choice.get("text"):
                    raise TypeError("no token_ids (the server must support return_token_ids)")
                if ids:
                    await queue.put(Tokens(op, b, tuple(int(i) for i in ids)))
                if reason := choice.get("finish_reason"):
                    await queue.put(Ended(op, b, str(reason)))
        except ServerError:
            raise
        except (ValueError, TypeError, AttributeError) as e:
            raise malformed(self.info.base_url, endpoint, f"{type(e).__name__}: {e}") from None
