"""What the HTTP backend and the remote engine share about a server: who it is, its errors,
and one JSON request with retries (no stage logic, no streaming here).

Contract: ``ServerInfo`` is read once from ``/v1/models``; ``ServerError`` is any error the server
answered or a reply that breaks the OpenAI API (``malformed``: the message names the server,
the endpoint and the fix); ``send_json`` retries connection errors and 5xx with backoff, never
a 4xx (it says what to fix).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

__all__ = [
    "ServerError",
    "ServerInfo",
    "error_text",
    "malformed",
    "send_json",
    "unreachable",
]


class ServerError(RuntimeError):
    """The server answered with an error, or with a reply that is not what the API promises."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the server answered {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class ServerInfo:
    """What the server serves (read once from ``/v1/models``)."""

    base_url: str
    model: str
    served: list[str]
    kind: str  # "vllm", "sglang" or another `owned_by`: decides the grammar field
    max_model_len: int | None
    root: str | None  # the served folder or hub id (where the tokenizer comes from)
    block_size: int | None = None  # tokens per KV block (vLLM's /metrics), None: unknown
    prefix_caching: bool | None = None  # whether its prefix cache is on, None: unknown

    def cache_advice(self) -> str | None:
        """What to change on the server so that N step requests share their prefix's KV
        (None: nothing, or unknown). The prefix cache shares whole blocks only: each step
        re-prefills the shared prefix's tokens past its last full block."""
        if self.prefix_caching is False:
            return (
                "the server's prefix cache is off, so every step request prefills the whole "
                "prompt: start vLLM without --no-enable-prefix-caching"
            )
        if self.block_size is not None and self.block_size > 32:
            return (
                f"the server's KV blocks hold {self.block_size} tokens and its prefix cache "
                f"shares whole blocks, so each step request re-prefills up to "
                f"{self.block_size - 1} tokens of the shared prefix: start vLLM with "
                "--block-size 32 (its CPU build; GPU builds default to 16)"
            )
        return None


def malformed(base_url: str, endpoint: str, what: str) -> ServerError:
    """The error for a reply that breaks the OpenAI API, naming the server and the fix."""
    msg = (
        f"{base_url}{endpoint} sent a malformed reply ({what}); point base_url at an "
        "OpenAI-compatible server (vLLM or SGLang) that serves /v1/completions with streaming"
    )
    return ServerError(200, msg)


def error_text(body: str) -> str:
    """The message inside an OpenAI-style error body (or the body itself)."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        data = json.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)
        return str(error)
    return body[:500]


def unreachable(base_url: str, error: httpx.TransportError) -> ConnectionError:
    """The error for a server that cannot be reached, with how to start one."""
    msg = (
        f"cannot reach the server at {base_url} ({type(error).__name__}: {error}); "
        "start it (e.g. `python -m vllm.entrypoints.openai.api_server --model <folder> "
        "--port 8000`) or fix base_url"
    )
    return ConnectionError(msg)


def _transient(error: BaseException) -> bool:
    if isinstance(error, ServerError):
        return error.status >= 500
    return isinstance(error, ConnectionError | httpx.TransportError)


async def send_json(
    client: httpx.AsyncClient, base_url: str, method: str, endpoint: str, body: Any, retries=2
) -> dict[str, Any]:
    """One JSON request, retried with backoff on connection errors and 5xx only; a reply that
    is not a JSON object is an error naming the server, the endpoint and the fix."""
    retrying = AsyncRetrying(
        stop=stop_after_attempt(retries + 1),
        wait=wait_exponential(multiplier=0.5, max=8),
        retry=retry_if_exception(_transient),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            try:
                response = await client.request(method, base_url + endpoint, json=body)
            except httpx.TransportError as e:
                raise unreachable(base_url, e) from e
            if response.status_code >= 400:
                raise ServerError(response.status_code, error_text(response.text))
            try:
                data = response.json()
            except ValueError:
                data = None
            if not isinstance(data, dict):
                raise malformed(base_url, endpoint, f"not a JSON object: {response.text[:80]!r}")
            return data
    raise AssertionError  # unreachable: AsyncRetrying re-raises the last error
