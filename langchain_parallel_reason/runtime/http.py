"""The stages' backend on an OpenAI-compatible server (vLLM, SGLang): transport only.

Contract: ``HttpBackend`` implements ``pipeline.backend.Backend`` over ``/v1/completions`` with
token-id prompts, so the server sees exactly the ids the local engine would (the chat template
is rendered here, by the model's own tokenizer). A "cache" is the list of ids the next
completion sends as its prompt (the server's prefix cache keeps their KV). Decoding N branches
is N streamed completions sent at once; their token ids come back as they are sampled and
pass through the same stop rules as the local decoder (``decoding.stops.Stopping``: stop ids,
stop strings, the loop guard) and the same budget: a branch that must end has its stream
closed, which aborts it on the server. Sampling settings travel as the server's parameters
(temperature, top_p, top_k, seed + b per branch, repetition_penalty, min_tokens for the first
tokens' bans, a grammar as structured output). Must run inside ``bridge.run_sync``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

from ..decoding.decoder import BranchesOutput, BranchResult, StepEvent
from ..decoding.sampling import make_generator, sample_next
from ..decoding.sequential import Cancelled, SequentialResult
from ..decoding.stops import Stopping
from ..pipeline.render import step_opening_banned_ids, stop_token_ids
from .bridge import in_bridge, wait_for
from .server import ServerError, ServerInfo, error_text, malformed, send_json, unreachable

__all__ = [
    "STEP_OPENING_REGEX",
    "HttpBackend",
    "ServerGrammar",
    "TokenCache",
]

# A step's opening, as the local decoder's first-token bans: right after the plan a small
# model tends to copy the placeholder ("......") or start the next title ("\n####..."), so the
# first character is a word character and the first 30 hold no "#" and no newline.
STEP_OPENING_REGEX = "[ ]?[^\\s#.\u2026]([^#\\n]{0,30}|[^#\\n]{30}[\\s\\S]*)"
# Server error texts that mean "this server cannot use the grammar or regex we sent".
GRAMMAR_WORDS = ("grammar", "structured", "guided", "ebnf", "xgrammar", "regex")


@dataclass
class TokenCache:
    """A sequence on the server: the ids the next completion sends as its prompt."""

    ids: list[int] = field(default_factory=list)

    def get_seq_length(self) -> int:
        """Tokens held."""
        return len(self.ids)


@dataclass
class ServerGrammar:
    """A grammar the server enforces (structured output); ``completed`` is set when the
    completion under it ended by the grammar's own end (finish reason "stop")."""

    ebnf: str | None = None
    json_schema: Any = None
    completed: bool = False

    def is_completed(self) -> bool:
        """Whether the grammar's text was complete."""
        return self.completed


class HttpBackend:
    """``pipeline.backend.Backend`` on a server (see the module docstring)."""

    def __init__(self, client: httpx.AsyncClient, info: ServerInfo, tokenizer: Any) -> None:
        self.client = client
        self.info = info
        self.tokenizer = tokenizer
        self.name = f"server ({info.kind or 'openai'}: concurrent requests, shared prefix cache)"
        self.device = torch.device("cpu")
        self.context_window = info.max_model_len or 1 << 30
        self.longer_context = "start the server with a larger --max-model-len"
        self.stop_ids = stop_token_ids(None, tokenizer)
        self.vocab_size = len(tokenizer)
        self.regex_ok = True  # False once the server refused the step-opening regex
        self.completions_running = 0
        self.notes: list[str] = []

    # -- caches -----------------------------------------------------------------------------

    def new_cache(self) -> TokenCache:
        """An empty sequence."""
        return TokenCache()

    def forward_tokens(self, ids: Sequence[int], cache: TokenCache, start: int) -> None:
        """Append ``ids`` (the server computes them with the next completion)."""
        cache.ids[start:] = [int(i) for i in ids]

    def crop(self, cache: TokenCache, length: int) -> None:
        """Keep the first ``length`` ids."""
        del cache.ids[length:]

    def grammar(self, *, ebnf: str | None = None, json_schema: Any = None, **_: Any) -> Any:
        """A grammar for the server's structured output."""
        if isinstance(json_schema, str):
            json_schema = json.loads(json_schema)
        return ServerGrammar(ebnf, json_schema)

    def kv_reuse_problem(self) -> str:
        """A server lays the steps out itself (its prefix cache holds what it has seen)."""
        return "the server prefills the laid-out steps from its own prefix cache"

    def lay_out_branches(self, *args: Any, **kwargs: Any) -> Any:
        """Not available on a server (see ``kv_reuse_problem``)."""
        raise NotImplementedError(self.kv_reuse_problem())

    # -- decoding ---------------------------------------------------------------------------

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
        gen = self._decode(context, [[]], kw, seeds=[kw.get("seed")])
        while True:
            try:
                _, token = next(gen)
            except StopIteration as stop:
                result = stop.value.branches[0]
                break
            yield token
        cache.ids[:] = [*context, *result.token_ids[:-1]]  # as a KV cache: the last never fed
        return SequentialResult(
            result.token_ids, result.finish_reason, result.stop, len(result.token_ids)
        )

    def iter_decode_branches(
        self, prefix_ids: Sequence[int], branch_prefixes: Sequence[Sequence[int]], **kw: Any
    ) -> Generator[StepEvent, None, BranchesOutput]:
        """N completions at once, one per branch (as ``iter_decode_branches``)."""
        seed = kw.get("seed")
        seeds = [None if seed is None else seed + b for b in range(len(branch_prefixes))]
        gen = self._decode(list(prefix_ids), [list(p) for p in branch_prefixes], kw, seeds)
        step = 0
        while True:
            try:
                b, token = next(gen)
            except StopIteration as stop:
                return stop.value
            yield StepEvent(step, (b,), (token,))
            step += 1

    def _decode(self, context, branches, kw, seeds) -> Generator:
        """Stream one completion per branch; yield ``(branch, token)``; return the results."""
        n = len(branches)
        budget = kw["max_new_tokens"]
        budgets = [budget] * n if isinstance(budget, int) else list(budget)
        stopping = Stopping.build(
            kw.get("stop_token_ids", ()),
            kw.get("stop_strings", ()),
            self.tokenizer,
            kw.get("loop_guard", False),
        )
        # A paragraph step's opening bans (the placeholder, a marker, a newline) become the
        # opening regex; a check step or a conclusion bans other ids, and gets none.
        suppress = kw.get("suppress")
        step = (
            suppress is not None
            and suppress.count > 0
            and set(step_opening_banned_ids(self.tokenizer)) <= set(suppress.token_ids)
        )
        bodies = [
            self._body([*context, *forced], budgets[b], seeds[b], kw, step=step)
            for b, forced in enumerate(branches)
        ]
        floor = int(suppress.count) if suppress is not None else 0
        cancel = kw.get("cancel")
        queue: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        tasks = [
            asyncio.ensure_future(self._stream(b, body, queue)) for b, body in enumerate(bodies)
        ]
        tokens: list[list[int]] = [[] for _ in range(n)]
        ends: list[tuple[str, Any] | None] = [None] * n
        try:
            while any(end is None for end in ends):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("decoding cancelled")
                b, kind, value = wait_for(queue.get())
                if ends[b] is not None:
                    continue  # tokens the server sent before it saw the stream close
                if kind == "error":
                    raise value
                if kind == "end":
                    ends[b] = ("length" if value == "length" else "stop", None)
                    continue
                for token in value:
                    tokens[b].append(token)
                    yield b, token
                    # Before min_tokens the server checks no stop (it bans EOS and stop ids
                    # meanwhile): neither does the client.
                    end = stopping.check(tokens[b]) if len(tokens[b]) > floor else None
                    if end is None and len(tokens[b]) >= budgets[b]:
                        end = ("length", None)  # the client holds the budget, whatever the server
                    if end is not None:
                        ends[b] = end
                        tasks[b].cancel()  # closes the stream: the server aborts the request
                        break
        finally:
            for task in tasks:
                task.cancel()
            if in_bridge():
                wait_for(asyncio.gather(*tasks, return_exceptions=True))
        results = [
            BranchResult(tokens[b], ends[b][0], len(tokens[b]), ends[b][1]) for b in range(n)
        ]
        grammar = kw.get("constraint")
        if isinstance(grammar, ServerGrammar):  # the server ends a finished grammar with EOS
            grammar.completed = results[0].finish_reason == "stop"
        total = sum(len(t) for t in tokens)
        # The server decodes the branches in one batch: about one pass per token of the longest.
        passes = max((len(t) for t in tokens), default=0)
        return BranchesOutput(results, passes, 0, self.name, total)

    def _body(self, prompt, max_tokens, seed, kw, *, step) -> dict[str, Any]:
        params = kw.get("params")
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
        if ids := kw.get("stop_token_ids"):
            body["stop_token_ids"] = list(ids)
        if strings := kw.get("stop_strings"):
            body["stop"] = list(strings)
        if (suppress := kw.get("suppress")) is not None and suppress.count:
            body["min_tokens"] = int(suppress.count)  # the server bans EOS / stop ids that long
        repetition = kw.get("repetition")
        if repetition is not None and repetition.penalty not in (None, 1.0):
            body["repetition_penalty"] = repetition.penalty
        if repetition is not None and repetition.bad_words:
            body["bad_words"] = list(repetition.bad_words)  # tokenized as the local ban is
            body["logit_bias"] = {str(i): -100 for i in repetition.single_token_bans()}
        if repetition is not None and repetition.ngram_size:
            note = "no_repeat_ngram_size is not a server sampling parameter: not applied there"
            if note not in self.notes:
                self.notes.append(note)
        grammar = kw.get("constraint")
        grammar = getattr(grammar, "inner", grammar)  # the plan's distinct-titles rule wraps it
        if isinstance(grammar, ServerGrammar):
            body |= self._structured(ebnf=grammar.ebnf, schema=grammar.json_schema)
        elif step and suppress is not None and self.regex_ok:
            body |= self._structured(regex=STEP_OPENING_REGEX)
        return body

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

    def _choose(self, context: list[int], constraint: Any, kw: dict[str, Any]) -> int:
        """One token among ``constraint.choice_ids`` (the router's yes/no), sampled here from
        the server's log-probabilities of those tokens with the caller's settings."""
        body = self._body(context, 1, None, {}, step=False) | {
            "stream": False,
            "logprobs": 20,
            "allowed_token_ids": list(constraint.choice_ids),
            "return_tokens_as_token_ids": True,
        }
        reply = wait_for(self.request("POST", "/completions", body))
        try:
            top = reply["choices"][0]["logprobs"]["top_logprobs"][0]
            scores = {int(k.split(":")[-1]): float(v) for k, v in top.items()}
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise malformed(
                self.info.base_url, "/completions", f"no token log-probabilities: {e}"
            ) from e
        logits = torch.full((self.vocab_size,), float("-inf"))
        for token, score in scores.items():
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

    # -- HTTP -------------------------------------------------------------------------------

    async def request(self, method: str, endpoint: str, body: Any) -> dict[str, Any]:
        """One JSON request to ``base_url + endpoint``; errors name the server and the fix."""
        return await send_json(self.client, self.info.base_url, method, endpoint, body)

    async def _stream(self, b: int, body: dict[str, Any], queue: asyncio.Queue) -> None:
        """Stream one completion, putting ``(b, "tokens" | "end" | "error", value)`` items."""
        endpoint = "/completions"
        try:
            for attempt in range(2):
                try:
                    await self._read_stream(b, body, queue, endpoint)
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
            await queue.put((b, "error", e))

    async def _read_stream(self, b, body, queue, endpoint) -> None:
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
                        await self._chunk(b, data, queue, endpoint)
                finally:
                    self.completions_running -= 1
        except httpx.TransportError as e:
            raise unreachable(self.info.base_url, e) from e

    async def _chunk(self, b: int, data: str, queue: asyncio.Queue, endpoint: str) -> None:
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
                    await queue.put((b, "tokens", [int(i) for i in ids]))
                if reason := choice.get("finish_reason"):
                    await queue.put((b, "end", str(reason)))
        except ServerError:
            raise
        except (ValueError, TypeError, AttributeError) as e:
            raise malformed(self.info.base_url, endpoint, f"{type(e).__name__}: {e}") from None
