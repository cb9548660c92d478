"""The remote path against a server that misbehaves: it never hangs, never answers empty, and
every bad reply is an error that names the server, the endpoint and the fix.

The server here is a real HTTP server on 127.0.0.1 (``http.server``) speaking the OpenAI
completions API with one deliberate fault per test; the client is the real chat model with
the real pipeline and the tiny model's tokenizer (the folder ``/v1/models`` names as root).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from langchain_parallel_reason import ChatParallelReason

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])

TOKENS = list(range(40, 120))  # plain tokens of the tiny vocabulary, never EOS, no loop


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fault = ""
    root = ""
    bodies: list[dict[str, Any]]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _json(self, status: int, data: Any) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        card = {"id": "m", "owned_by": "vllm", "max_model_len": 2048, "root": self.server.root}
        self._json(200, {"object": "list", "data": [card]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.bodies.append(body)
        fault = self.server.fault
        if fault == "refuse_regex" and "regex" in json.dumps(body.get("structured_outputs", {})):
            self._json(400, {"error": {"message": "regex is not supported by this backend"}})
            return
        if fault == "plain_json":
            self._json(200, {"choices": [{"text": "hello", "finish_reason": "stop"}]})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        try:
            if fault == "bad_json":
                self.wfile.write(b"data: {not json\n\n")
            elif fault == "list_chunk":
                self.wfile.write(b"data: []\n\n")
            else:  # "ignore_max_tokens" streams forever; others stop at max_tokens
                n = 0
                while fault == "ignore_max_tokens" or n < int(body.get("max_tokens", 4)):
                    ids = [TOKENS[n % len(TOKENS)]]
                    chunk = {"choices": [{"text": "x", "token_ids": ids, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    n += 1
                end = {"choices": [{"text": "", "token_ids": [], "finish_reason": "length"}]}
                self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client closed the stream: what it must do past its budget


@pytest.fixture
def server(tiny_model_dir: Path) -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.root = str(tiny_model_dir)
    srv.bodies = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _llm(server: _Server, **kw: Any) -> ChatParallelReason:
    host, port = server.server_address[:2]
    return ChatParallelReason(base_url=f"http://{host}:{port}/v1", model="m", **kw)


def test_the_client_holds_the_budget_when_the_server_ignores_it(server: _Server) -> None:
    server.fault = "ignore_max_tokens"
    msg = _llm(server, mode="sequential", max_tokens=16, timeout=60).invoke("hi")
    assert msg.usage_metadata["output_tokens"] == 16
    assert msg.response_metadata["finish_reason"] == "length"


@pytest.mark.parametrize("fault", ["bad_json", "list_chunk", "plain_json"])
def test_a_malformed_reply_is_an_error_naming_server_endpoint_and_fix(
    server: _Server, fault: str
) -> None:
    server.fault = fault
    with pytest.raises(
        RuntimeError, match=r"127\.0\.0\.1.*/completions.*malformed.*OpenAI-compatible"
    ):
        _llm(server, mode="sequential", max_tokens=8).invoke("hi")


def test_a_refused_step_regex_is_dropped_and_the_callers_steps_kept(server: _Server) -> None:
    server.fault = "refuse_regex"
    msg = _llm(server, steps=["Tea", "Coffee"], max_tokens=64, step_max_tokens=8).invoke("hi")
    report = msg.response_metadata["parallel"]
    assert report["mode_used"] == "parallel"
    assert report["steps"] == ["Tea", "Coffee"]
    assert any("refused the step-opening regex" in note for note in report["notes"])


def test_the_same_input_checks_as_local(server: _Server) -> None:
    with pytest.raises(ValueError, match="surrogate"):
        _llm(server, max_tokens=8).invoke("tea \ud800 coffee")


def test_many_remote_chat_models_share_one_client_thread(server: _Server) -> None:
    server.fault = ""
    before = {t.name for t in threading.enumerate()}
    for _ in range(30):
        _llm(server, mode="sequential", max_tokens=2).invoke("hi")
    http_threads = [t for t in threading.enumerate() if t.name == "parallel-reason-http"]
    assert len(http_threads) == 1
    assert len({t.name for t in threading.enumerate()} - before) <= 1


def test_server_sampling_parameters_are_sent(server: _Server) -> None:
    server.fault = ""
    _llm(server, mode="sequential", max_tokens=4, repetition_penalty=1.3, seed=7).invoke("hi")
    body = server.bodies[-1]
    assert body["repetition_penalty"] == 1.3
    assert body["seed"] == 7
    assert body["max_tokens"] == 4
    assert isinstance(body["prompt"], list)  # token ids rendered by the model's own template


def test_token_counts_use_the_served_models_tokenizer(server: _Server, tiny_tokenizer: Any) -> None:
    text = "Hello world, this is a test."
    expected = len(tiny_tokenizer.encode(text, add_special_tokens=False))
    assert _llm(server).get_num_tokens(text) == expected > 0
