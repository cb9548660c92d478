"""The pipeline on an OpenAI-compatible server (vLLM, SGLang) over HTTP (no LangChain here).

Contract: ``RemoteEngine(base_url, model)`` serves ``runtime.base.Request`` objects like the
local engine: ``stream``/``astream`` yield ``("event", e)`` items, then ``("done", AnswerResult)``.
Every request runs the same pipeline as in-process (route, plan, steps, conclusion, blocks,
fallbacks, report) as a ``pipeline.machine.RequestMachine`` that an ``http.HttpDriver`` runs on
an event loop; only the decoding happens on the server. One loop thread shared by every remote
engine serves synchronous calls, and ``astream`` runs on the caller's own loop. The model's tokenizer renders the chat
template here (loaded once from the folder the server serves, or ``tokenizer=``). Closing the
stream or cancelling the task closes every HTTP stream, which aborts the requests on the server.
"""

from __future__ import annotations

import asyncio
import queue
import re
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

from ..pipeline.machine import RequestMachine
from .base import Item, Request
from .http import HttpDriver
from .server import ServerError, ServerInfo, malformed, send_json

__all__ = ["RemoteEngine", "ServerError"]

_END = object()  # end of one call's item queue
# Server error texts (vLLM, SGLang) that mean "the prompt does not fit the context window".
CONTEXT_WORDS = ("maximum context length", "context length", "max_model_len", "too long")


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _shared_loop() -> asyncio.AbstractEventLoop:
    """The one event loop (on one daemon thread) that serves every synchronous remote call."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            loop = asyncio.new_event_loop()
            threading.Thread(
                target=loop.run_forever, name="parallel-reason-http", daemon=True
            ).start()
            _LOOP = loop
        return _LOOP


class RemoteEngine:
    """An engine whose model runs on an OpenAI-compatible server (vLLM or SGLang).

    Args:
        base_url: the server's OpenAI API root, e.g. ``"http://127.0.0.1:8000/v1"``.
        model: the served model name (``--served-model-name``); None = the only one served.
        api_key: sent as a bearer token when given (``--api-key`` on the server).
        retries: re-tries (exponential backoff) of a JSON request that could not connect or
            got a 5xx answer; 4xx answers are never retried: they say what to fix.
        connect_timeout: seconds to wait for a connection.
        tokenizer: the served model's tokenizer, or a folder / hub id to load it from; None =
            the folder the server reports it serves (``root`` in ``/v1/models``).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        retries: int = 2,
        connect_timeout: float = 10.0,
        tokenizer: Any = None,
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
        self._tokenizer = tokenizer
        self._running = 0
        self._served = 0
        self._drivers: weakref.WeakSet[HttpDriver] = weakref.WeakSet()  # one per live request

    # -- the contract ------------------------------------------------------------------

    def stream(self, request: Request) -> Iterator[Item]:
        """Run ``request``; yield its items. Closing the iterator cancels the request (its
        HTTP work runs on the one shared event-loop thread: no thread per call)."""
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        future = asyncio.run_coroutine_threadsafe(self._produce(request, items.put), _shared_loop())
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
        """Requests running and served, HTTP completions in flight, the server's model and
        its KV cache set-up (block size, prefix caching: None where the server does not say)."""
        return {
            "engine": "remote",
            "base_url": self.base_url,
            "model": self._info.model if self._info else self.model,
            "running": self._running,  # the local engine's key
            "requests_running": self._running,
            "requests_served": self._served,
            "completions_running": sum(d.completions_running for d in list(self._drivers)),
            "block_size": self._info.block_size if self._info else None,
            "prefix_caching": self._info.prefix_caching if self._info else None,
        }

    @property
    def tokenizer(self) -> Any:
        """The served model's tokenizer (loaded on first use; see the class docstring)."""
        if self._tokenizer is None or isinstance(self._tokenizer, str):
            future = asyncio.run_coroutine_threadsafe(self._setup(), _shared_loop())
            future.result()
        return self._tokenizer

    # -- one request -------------------------------------------------------------------

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

    async def _answer(self, request: Request, emit: Callable[[Item], None]) -> Any:
        async with httpx.AsyncClient(headers=self._headers, timeout=self._timeout) as client:
            info, tokenizer = await self._setup(client)
            tokenizer = request.tokenizer or tokenizer
            messages, tools, config = request.messages, request.tools, request.config
            if request.prepare is not None:
                messages, tools, config = request.prepare(tokenizer)
            driver = HttpDriver(client, info, tokenizer)
            self._drivers.add(driver)
            machine = RequestMachine(driver.backend_info, tokenizer, messages, config, tools=tools)
            try:
                return await driver.run(machine, lambda event: emit(("event", event)))
            except ServerError as e:
                raise self._as_value_error(e) from e

    async def _setup(self, client: httpx.AsyncClient | None = None) -> tuple[ServerInfo, Any]:
        """The served model (checked once per engine: a wrong name lists the served ones)
        and its tokenizer."""
        if client is None:
            async with httpx.AsyncClient(headers=self._headers, timeout=self._timeout) as own:
                return await self._setup(own)
        if self._info is None:
            body = await send_json(client, self.base_url, "GET", "/models", None, self.retries)
            cards = body.get("data")
            if not isinstance(cards, list) or not all(isinstance(c, dict) for c in cards):
                raise malformed(self.base_url, "/models", "no list of models")
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
            self._info = ServerInfo(
                self.base_url,
                model,
                served,
                str(card.get("owned_by") or ""),
                int(length) if isinstance(length, int | str) and str(length).isdigit() else None,
                card.get("root"),
                *(await _cache_config(client, self.base_url)),
            )
            self.name = model
        if self._tokenizer is None or isinstance(self._tokenizer, str):
            source = self._tokenizer or self._info.root or self._info.model
            loop = asyncio.get_running_loop()
            self._tokenizer = await loop.run_in_executor(None, _load_tokenizer, source)
        return self._info, self._tokenizer

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


async def _cache_config(client: httpx.AsyncClient, base_url: str) -> tuple[Any, Any]:
    """``(block_size, prefix_caching)`` from vLLM's ``/metrics`` (``vllm:cache_config_info``);
    ``(None, None)`` where the server does not say (SGLang, a proxy, no metrics)."""
    root = base_url.removesuffix("/").removesuffix("/v1")
    try:
        reply = await client.get(root + "/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None, None
    line = next((x for x in reply.text.splitlines() if x.startswith("vllm:cache_config_info{")), "")
    size = re.search(r'[{,]block_size="(\d+)"', line)
    caching = re.search(r'enable_prefix_caching="(\w+)"', line)
    return (
        int(size.group(1)) if size else None,
        caching.group(1) == "True" if caching else None,
    )


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        msg = (
            f"cannot load the served model's tokenizer from {source!r} ({e}); pass "
            "tokenizer=<the folder or hub id of the served model> to the remote engine"
        )
        raise ValueError(msg) from e
