"""The three stages on an OpenAI-compatible server (vLLM, SGLang) over HTTP (no LangChain here).

Contract: ``RemoteEngine(base_url, model)`` serves ``runtime.base.Request`` objects like the
local engine: ``stream``/``astream`` yield ``("event", e)`` items, then ``("done", AnswerResult)``.
The server renders the chat template (``/v1/chat/completions``; a partial assistant message is
continued with ``continue_final_message``), so the client needs no weights and no tokenizer.
Stage 1 sends the plan grammar as the server's structured output; Stage 2 sends one streamed
completion per step, all at once, continuing the same prefix (the server's prefix cache stores
it once and its scheduler decodes the steps in one batch), or in mode "stepped" one after
another, each continuing the earlier ones; Stage 3 continues the merged text.
Closing the stream or cancelling the task closes every HTTP stream, which aborts the requests
on the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
)

from ..pipeline import (
    MIN_STEP_TOKENS,
    PLAN_TITLE_CHARS,
    AnswerResult,
    ContentDelta,
    FallbackEvent,
    OutputGrammar,
    PlanEvent,
    StepDelta,
    StepsDoneEvent,
    block_report,
    merged_steps_text,
    resample_settings,
    step_token_budget,
    steps_content,
    with_system,
)
from ..plan import PlanFormatError, format_plan, parse_plan, plan_grammar_ebnf
from ..prompts import END_MARKER, STEP_MARKER, conclusion_cue, stage1_system_prompt, step_header
from ..schemas import ParallelReport, Plan
from .base import Item, Request
from .remote_parts import (
    CONTEXT_WORDS,
    GRAMMAR_WORDS,
    STEP_OPENING_REGEX,
    Completion,
    LeadingSpace,
    RemoteCall,
    ServerError,
    ServerInfo,
    error_text,
    grammar_body,
    remote_route,
    retrying,
    steps_answer,
    unreachable,
    with_partial,
)

__all__ = ["STEP_OPENING_REGEX", "RemoteEngine", "ServerError", "remote_route"]

_END = object()  # end of one call's item queue


class RemoteEngine:
    """An engine whose model runs on an OpenAI-compatible server (vLLM or SGLang).

    Args:
        base_url: the server's OpenAI API root, e.g. ``"http://127.0.0.1:8000/v1"``.
        model: the served model name (``--served-model-name``); None = the only one served.
        api_key: sent as a bearer token when given (``--api-key`` on the server).
        retries: re-tries (exponential backoff) of an HTTP request that could not connect or
            got a 5xx answer, before any of its text arrived; a request's ``max_retries`` can
            raise it. 4xx answers are never retried: they say what to fix.
        connect_timeout: seconds to wait for a connection.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        retries: int = 2,
        connect_timeout: float = 10.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            msg = f"base_url={base_url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)"
            raise ValueError(msg)
        self.base_url = base_url.rstrip("/")
        # /tokenize and /metrics live at the server's root, beside /v1.
        self.root_url = self.base_url.removesuffix("/v1")
        self.model = model
        self.name = model or "remote"
        self.retries = retries
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(connect=connect_timeout, read=600.0, write=60.0, pool=None)
        self._info: ServerInfo | None = None
        self._grammar_ok = True  # False once the server refused a grammar (then plans are free)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._running = 0
        self._completions_running = 0
        self._served = 0

    # -- the contract ------------------------------------------------------------------

    def stream(self, request: Request) -> Iterator[Item]:
        """Run ``request``; yield its items. Closing the iterator cancels the request.

        The HTTP work runs on one event-loop thread owned by the engine (shared by every
        synchronous call), so a synchronous call costs no thread of its own.
        """
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        future = asyncio.run_coroutine_threadsafe(self._produce(request, items.put), self._bg())
        future.add_done_callback(lambda _: items.put(_END))
        try:
            while (item := items.get()) is not _END:
                yield item
            if not future.cancelled() and (error := future.exception()) is not None:
                raise error
        finally:
            future.cancel()  # no-op when done; else the task's HTTP streams are closed

    async def astream(self, request: Request) -> AsyncIterator[Item]:
        """Async ``stream`` on the caller's event loop; cancelling or closing it cancels the
        request and waits until its HTTP streams are closed."""
        items: asyncio.Queue[Any] = asyncio.Queue()
        task = asyncio.create_task(self._produce(request, items.put_nowait))
        task.add_done_callback(lambda _: items.put_nowait(_END))
        try:
            while (item := await items.get()) is not _END:
                yield item
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])

    def stats(self) -> dict[str, Any]:
        """Requests running and served, HTTP completions in flight, the server's model."""
        return {
            "engine": "remote",
            "base_url": self.base_url,
            "model": self._info.model if self._info else self.model,
            "requests_running": self._running,
            "requests_served": self._served,
            "completions_running": self._completions_running,
        }

    # -- plumbing ----------------------------------------------------------------------

    def _bg(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=loop.run_forever, name="parallel-reason-remote", daemon=True
                ).start()
                self._loop = loop
            return self._loop

    async def _produce(self, request: Request, emit: Callable[[Item], None]) -> None:
        self._running += 1
        try:
            deadline = asyncio.timeout(request.timeout)
            try:
                async with deadline:
                    result = await self._answer(request, emit)
            except TimeoutError as e:
                if not deadline.expired():
                    raise
                msg = (
                    f"ChatParallelReason did not finish within timeout={request.timeout} s and "
                    "was cancelled (its server requests closed); raise `timeout` or lower "
                    "`max_tokens`"
                )
                raise TimeoutError(msg) from e
            self._served += 1
            emit(("done", result))
        finally:
            self._running -= 1

    async def _answer(self, request: Request, emit: Callable[[Item], None]) -> AnswerResult:
        messages, cfg = request.messages, request.config
        if request.prepare is not None:  # tools and output form: rendered as text, no template
            messages, _, cfg = request.prepare(None)
        if not messages:
            raise ValueError("messages is empty: pass at least one user message")
        async with httpx.AsyncClient(headers=self._headers, timeout=self._timeout) as client:
            info = await self._server_info(client)
            call = RemoteCall(
                cfg, messages, emit, client, info, max(self.retries, request.max_retries)
            )
            route, route_reason, call.notes = remote_route(cfg)
            result = await self._routed(call)
        report = result.report
        update: dict[str, Any] = {"route": route, "route_reason": route_reason}
        if report.mode_used == "parallel":
            update["blocks"] = [block_report(report)]
        return dataclasses.replace(result, report=report.model_copy(update=update))

    async def _routed(self, call: RemoteCall) -> AnswerResult:
        cfg = call.cfg
        t0 = time.perf_counter()
        if cfg.mode == "sequential":
            return await self._sequential(call, None, 0, t0)
        reason = cfg.sequential_reason
        if reason is None and cfg.grammar is not None:
            reason = "an output grammar is set: the answer is decoded sequentially"
        if reason is not None:
            return await self._sequential(call, reason, 0, t0)
        return await self._parallel(call, t0)

    async def _server_info(self, client: httpx.AsyncClient) -> ServerInfo:
        """The served models (checked once per engine): the fix for a wrong name lists them."""
        if self._info is not None:
            return self._info
        body = await self._request(client, "GET", f"{self.base_url}/models", None, self.retries)
        cards = body.get("data") or []
        served = [str(card.get("id")) for card in cards]
        model = self.model
        if model is None:
            if len(served) != 1:
                msg = f"the server at {self.base_url} serves {served}: pass model=<one of them>"
                raise ValueError(msg)
            model = served[0]
        elif model not in served:
            msg = (
                f"model={model!r} is not served at {self.base_url}; it serves {served}: pass "
                "model=<one of them> (the server's --served-model-name)"
            )
            raise ValueError(msg)
        card = cards[served.index(model)]
        length = card.get("max_model_len")
        info = ServerInfo(
            model, served, str(card.get("owned_by") or ""), int(length) if length else None
        )
        self._info = info
        self.name = model
        return info

    async def _request(
        self, client: httpx.AsyncClient, method: str, url: str, body: Any, retries: int
    ) -> dict[str, Any]:
        """One JSON request, retried with backoff on connection errors and 5xx only."""
        async for attempt in retrying(retries):
            with attempt:
                try:
                    response = await client.request(method, url, json=body)
                except httpx.TransportError as e:
                    raise unreachable(self.base_url, e) from e
                if response.status_code >= 400:
                    raise ServerError(response.status_code, error_text(response.text))
                return response.json()
        raise AssertionError  # unreachable: AsyncRetrying re-raises the last error

    async def _count(
        self, call: RemoteCall, messages: list[dict[str, Any]], partial: str | None
    ) -> int | None:
        """Prompt tokens of ``messages`` (+ a partial assistant message) by the server's
        template (``/tokenize``); None when the server has no such endpoint."""
        body: dict[str, Any] = {
            "model": call.info.model,
            "messages": with_partial(messages, partial),
        }
        if partial is not None:
            body |= {"add_generation_prompt": False, "continue_final_message": True}
        try:
            out = await self._request(
                call.client, "POST", f"{self.root_url}/tokenize", body, call.retries
            )
        except ServerError as e:
            if e.status in (404, 405):
                return None
            raise self._as_value_error(e) from e
        return int(out["count"]) if "count" in out else None

    def _as_value_error(self, error: ServerError) -> Exception:
        if any(word in error.message.lower() for word in CONTEXT_WORDS):
            limit = self._info.max_model_len if self._info else None
            msg = (
                f"the prompt does not fit the server's context window (max_model_len={limit}): "
                f"{error.message}; shorten the messages, lower max_tokens, or start the server "
                "with a larger --max-model-len"
            )
            return ValueError(msg)
        return error

    async def _complete(
        self,
        call: RemoteCall,
        messages: list[dict[str, Any]],
        *,
        partial: str | None,
        max_tokens: int,
        stop: Sequence[str] = (),
        temperature: float | None = None,
        seed: int | None = None,
        min_tokens: int = 0,
        extra: dict[str, Any] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        """One streamed chat completion; ``on_text`` gets each piece of text as it arrives.

        ``partial`` is an unfinished assistant message the server continues (its chat
        template, ``continue_final_message``); None starts a new assistant turn.
        """
        cfg = call.cfg
        body: dict[str, Any] = {
            "model": call.info.model,
            "messages": with_partial(messages, partial),
            "max_tokens": max_tokens,
            "temperature": cfg.temperature if temperature is None else temperature,
            "top_p": cfg.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if partial is not None:
            body |= {"add_generation_prompt": False, "continue_final_message": True}
        if cfg.top_k:
            body["top_k"] = cfg.top_k
        seed = cfg.seed if seed is None else seed
        if seed is not None:
            body["seed"] = seed
        if stop:
            body["stop"] = list(stop)
        if min_tokens:
            body["min_tokens"] = min_tokens
        body |= extra or {}
        out = Completion()
        received = False
        async for attempt in retrying(call.retries):
            with attempt:
                try:
                    async with call.client.stream(
                        "POST", f"{self.base_url}/chat/completions", json=body
                    ) as response:
                        if response.status_code >= 400:
                            error = ServerError(
                                response.status_code, error_text((await response.aread()).decode())
                            )
                            raise error
                        self._completions_running += 1
                        try:
                            async for line in response.aiter_lines():
                                if not line.startswith("data:"):
                                    continue
                                data = line[5:].strip()
                                if data == "[DONE]":
                                    break
                                chunk = json.loads(data)
                                if "error" in chunk:  # an error after the stream started
                                    error = chunk["error"]
                                    text = (
                                        error.get("message", str(error))
                                        if isinstance(error, dict)
                                        else str(error)
                                    )
                                    # Status 200: the stream had started; not retried.
                                    raise ServerError(200, text)
                                for choice in chunk.get("choices") or ():
                                    text = (choice.get("delta") or {}).get("content") or ""
                                    if text:
                                        received = True
                                        out.text += text
                                        if on_text is not None:
                                            on_text(text)
                                    if choice.get("finish_reason"):
                                        out.finish_reason = choice["finish_reason"]
                                if usage := chunk.get("usage"):
                                    out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                                    out.completion_tokens = int(usage.get("completion_tokens") or 0)
                        finally:
                            self._completions_running -= 1
                except httpx.TransportError as e:
                    if received:  # text was passed on already: not retried (no cause)
                        msg = f"the server at {self.base_url} dropped the stream: {e}"
                        raise ConnectionError(msg) from None
                    raise unreachable(self.base_url, e) from e
        call.output_tokens += out.completion_tokens
        return out

    # -- the stages --------------------------------------------------------------------

    async def _sequential(
        self, call: RemoteCall, reason: str | None, attempts: int, t0: float
    ) -> AnswerResult:
        """Plain decoding of the whole answer from the caller's messages (also the fallback)."""
        if reason is not None:
            call.event(FallbackEvent(reason))
        cfg = call.cfg
        grammar: OutputGrammar | None = cfg.grammar
        prefix = grammar.prefix if grammar is not None else ""
        partial = prefix or None
        extra = None
        if grammar is not None:
            extra = (
                grammar_body(call, ebnf=grammar.ebnf)
                if grammar.ebnf is not None
                else grammar_body(call, schema=json.loads(grammar.json_schema))
            )
        # A grammar decides where the answer ends: a stop string inside a JSON string would cut it.
        stops = () if grammar is not None else cfg.stop
        budget = cfg.max_tokens
        count = await self._count(call, call.messages, partial)
        limit = call.info.max_model_len
        if count is not None and limit is not None:
            if count >= limit:
                raise self._as_value_error(
                    ServerError(
                        400, f"the prompt has {count} tokens, the maximum context length is {limit}"
                    )
                )
            budget = max(1, min(budget, limit - count))
        if prefix:
            call.event(ContentDelta(prefix))
        t = time.perf_counter()
        lead = LeadingSpace(lambda text: call.event(ContentDelta(text)), strip=not prefix)
        try:
            out = await self._complete(
                call,
                call.messages,
                partial=partial,
                max_tokens=budget,
                stop=stops,
                extra=extra,
                on_text=lead,
            )
        except ServerError as e:
            raise self._as_value_error(e) from e
        text = out.text.lstrip() if not prefix else out.text
        if grammar is not None:
            suffix = grammar.suffix if out.finish_reason != "length" else ""
            if suffix:
                call.event(ContentDelta(suffix))
            text = prefix + text + suffix
        call.input_tokens = call.input_tokens or out.prompt_tokens
        call.timings["sequential"] = time.perf_counter() - t
        call.timings["total"] = time.perf_counter() - t0
        report = ParallelReport(
            mode_used="sequential",
            fallback_reason=reason,
            plan_attempts=attempts,
            timings=call.timings,
            notes=call.notes,
        )
        finish = "length" if out.finish_reason == "length" else "stop"
        return AnswerResult(text, report, call.input_tokens, call.output_tokens, finish)

    async def _plan(self, call: RemoteCall, messages: list[dict[str, Any]], budget: int) -> Plan:
        """Stage 1: the plan under the server's grammar, validated, re-sampled when it fails
        (``call.plan_attempts`` counts the tries); raises the last `PlanFormatError`."""
        cfg = call.cfg
        grammar = (
            plan_grammar_ebnf(cfg.max_branches, PLAN_TITLE_CHARS) if cfg.constrain_plan else None
        )
        unconstrained = "the server refused the plan grammar earlier: plan decoded unconstrained"

        async def attempt() -> Plan:
            call.plan_attempts += 1
            temperature, seed = resample_settings(cfg.temperature, cfg.seed, call.plan_attempts)
            kw: dict[str, Any] = {
                "partial": None,
                "max_tokens": budget,
                "temperature": temperature,
                "seed": seed,
            }
            if grammar is not None and self._grammar_ok:
                try:
                    out = await self._complete(
                        call, messages, extra=grammar_body(call, ebnf=grammar), **kw
                    )
                except ServerError as e:
                    if e.status != 400 or not any(w in e.message.lower() for w in GRAMMAR_WORDS):
                        raise
                    self._grammar_ok = False
                    call.notes.append(
                        f"the server refused the plan grammar ({e.message[:200]}); plans are decoded unconstrained"
                    )
                    out = await self._complete(call, messages, stop=(END_MARKER,), **kw)
            else:
                if grammar is not None and not any("refused the plan" in n for n in call.notes):
                    call.notes.append(unconstrained)
                out = await self._complete(call, messages, stop=(END_MARKER,), **kw)
            call.input_tokens = call.input_tokens or out.prompt_tokens
            return parse_plan(
                out.text, max_branches=cfg.max_branches, max_title_chars=PLAN_TITLE_CHARS
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(cfg.plan_retries + 1),
            retry=retry_if_exception_type(PlanFormatError),
            reraise=True,
        )
        return await retrying(attempt)

    async def _parallel(self, call: RemoteCall, t0: float) -> AnswerResult:
        cfg = call.cfg
        messages = with_system(call.messages, stage1_system_prompt(cfg.max_branches))
        limit = call.info.max_model_len
        count = await self._count(call, messages, None)
        if count is not None:
            call.input_tokens = count
            if limit is not None and count + MIN_STEP_TOKENS > limit:
                reason = f"the planning prompt ({count} tokens) leaves no room in the context window ({limit} tokens)"
                return await self._sequential(call, reason, 0, t0)

        # Stage 1: the plan (or the caller's steps).
        t = time.perf_counter()
        attempts = 0
        if cfg.steps is not None:
            try:
                plan = Plan.model_validate(
                    {"preamble": "", "titles": list(cfg.steps)},
                    context={"max_branches": cfg.max_branches, "max_title_chars": 200},
                )
            except ValueError as e:
                raise ValueError(f"steps= is not a usable plan: {e}") from e
        else:
            budget = min(cfg.plan_max_tokens, cfg.max_tokens)
            if count is not None and limit is not None:
                budget = min(budget, limit - count)
            try:
                plan = await self._plan(call, messages, budget)
                attempts = call.plan_attempts
            except PlanFormatError as e:
                call.timings["plan"] = time.perf_counter() - t
                attempts = call.plan_attempts
                reason = f"plan did not validate after {attempts} attempt(s): {e}"
                return await self._sequential(call, reason, attempts, t0)
            except ServerError as e:
                raise self._as_value_error(e) from e
        call.timings["plan"] = time.perf_counter() - t
        call.event(PlanEvent(list(plan.titles), plan.preamble))

        # Budgets: the steps and the conclusion share max_tokens and the context window.
        n = len(plan.titles)
        prefix = format_plan(plan) + "\n"
        headers = [step_header(title) for title in plan.titles]
        context_left = 1 << 30
        if limit is not None:
            layout = merged_steps_text(headers, [""] * n) + conclusion_cue()
            counted = await self._count(call, messages, prefix + layout)
            if counted is not None:
                context_left = limit - counted - 8 * (n + 1)
        per_step = step_token_budget(
            n, cfg.step_max_tokens, cfg.max_tokens - call.output_tokens, context_left
        )
        if per_step < MIN_STEP_TOKENS:
            reason = (
                f"budget too small for {n} parallel steps ({per_step} tokens each; "
                f"max_tokens={cfg.max_tokens}, context={limit})"
            )
            return await self._sequential(call, reason, attempts, t0)
        steps = (
            self._stepped_steps_and_conclusion
            if cfg.mode == "stepped"
            else self._steps_and_conclusion
        )
        try:
            return await steps(call, plan, messages, prefix, headers, per_step, attempts, t0)
        except (ConnectionError, ValueError, asyncio.CancelledError):
            raise
        except Exception as e:
            reason = f"parallel decoding failed ({type(e).__name__}: {e})"
            return await self._sequential(call, reason, attempts, t0)

    async def _step(
        self, call: RemoteCall, messages, partial: str, b: int, title: str, per_step: int
    ) -> Completion:
        """Step ``b``: one streamed completion continuing ``partial`` (which ends with its
        header), with the parallel path's budget, stops, seed + b and opening rule."""
        cfg = call.cfg
        emit = LeadingSpace(lambda text: call.event(StepDelta(b, title, text)))
        return await self._complete(
            call,
            messages,
            partial=partial,
            max_tokens=per_step,
            stop=(STEP_MARKER, *cfg.stop),
            seed=None if cfg.seed is None else cfg.seed + b,
            # A small model may open a step with the next title: EOS is banned this long.
            min_tokens=min(MIN_STEP_TOKENS, per_step // 2),
            extra=grammar_body(call, regex=STEP_OPENING_REGEX) if self._grammar_ok else None,
            on_text=emit,
        )

    async def _steps_and_conclusion(
        self, call, plan, messages, prefix, headers, per_step, attempts, t0
    ) -> AnswerResult:
        n = len(plan.titles)
        t = time.perf_counter()
        if call.cfg.conclusion_kv == "reuse":
            call.notes.append(
                "conclusion_kv='reuse' needs the local engine: the server prefilled the steps"
            )

        # Stage 2: one completion per step, all in flight at once, each continuing the same
        # prefix (plan) + its own header; step b samples with seed + b, as locally.
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    self._step(call, messages, prefix + headers[b], b, plan.titles[b], per_step)
                )
                for b in range(n)
            ]
        outs = [task.result() for task in tasks]
        call.timings["steps"] = time.perf_counter() - t
        bodies = [out.text.strip() for out in outs]
        # Stage 3: the steps laid out in plan order, then the conclusion.
        partial = prefix + merged_steps_text(headers, bodies) + conclusion_cue()
        steps_md, conclusion, finish = await self._conclusion(call, messages, plan, outs, partial)
        branch_tokens = [out.completion_tokens for out in outs]
        longest = max(branch_tokens, default=0)
        return steps_answer(
            call, "parallel", plan, outs, attempts, t0, steps_md + conclusion, finish,
            # The server decodes the steps in one batch: about one pass per token of the longest.
            decode_steps=longest,
            tokens_per_forward=(sum(branch_tokens) / longest) if longest else None,
            conclusion_kv="reprefill",
            attention=f"server ({call.info.kind or 'openai'}: concurrent requests, shared prefix cache)",
        )  # fmt: skip

    async def _stepped_steps_and_conclusion(
        self, call, plan, messages, prefix, headers, per_step, attempts, t0
    ) -> AnswerResult:
        """Mode "stepped" (the paper's baseline) on the server: one completion after another,
        each continuing the prefix and every earlier step as laid out text (the server's prefix
        cache holds what came before), then the same conclusion."""
        t = time.perf_counter()
        written, outs = prefix, []
        for b, title in enumerate(plan.titles):
            out = await self._step(call, messages, written + headers[b], b, title, per_step)
            outs.append(out)
            written += merged_steps_text([headers[b]], [out.text.strip()])
        call.timings["steps"] = time.perf_counter() - t
        steps_md, conclusion, finish = await self._conclusion(
            call, messages, plan, outs, written + conclusion_cue()
        )
        tokens = sum(out.completion_tokens for out in outs)
        return steps_answer(
            call, "stepped", plan, outs, attempts, t0, steps_md + conclusion, finish,
            decode_steps=tokens, tokens_per_forward=1.0 if tokens else None,
        )  # fmt: skip

    async def _conclusion(
        self, call: RemoteCall, messages, plan: Plan, outs: list[Completion], partial: str
    ) -> tuple[str, str, str]:
        """Stage 3: send the steps as content, then continue ``partial`` (the laid-out steps
        and the cue) with the conclusion; returns (steps content, conclusion, finish)."""
        cfg = call.cfg
        t = time.perf_counter()
        call.event(StepsDoneEvent([o.completion_tokens for o in outs]))
        bodies = [out.text.strip() for out in outs]
        steps_md = steps_content(plan.preamble.strip(), plan.titles, bodies)
        call.event(ContentDelta(steps_md))
        budget = cfg.max_tokens - call.output_tokens
        finish = "length"
        conclusion = ""
        if budget >= 1:
            lead = LeadingSpace(lambda text: call.event(ContentDelta(text)))
            try:
                out = await self._complete(
                    call,
                    messages,
                    partial=partial,
                    max_tokens=budget,
                    stop=(*cfg.stop, STEP_MARKER),
                    on_text=lead,
                )
                conclusion = out.text.lstrip()
                finish = "length" if out.finish_reason == "length" else "stop"
            except ServerError as e:
                call.notes.append(f"conclusion failed ({e}); answer ends there")
        call.timings["conclusion"] = time.perf_counter() - t
        return steps_md, conclusion, finish
