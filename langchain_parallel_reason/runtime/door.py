"""The one door into the runtime: ``open_engine`` loads a model (or reaches a server) and keeps
the one registry of engines.

Contract: ``open_engine(model=...)`` gives the in-process ``Engine`` of a model (loaded once per
loading settings, shared by every caller that asks with the same settings);
``open_engine(loaded=(model, tokenizer))`` the engine of a model already in memory (one per
model object); ``open_engine(base_url=...)`` the ``RemoteEngine`` of an OpenAI-compatible
server (one per server, model and key; the last 8 stay held when no caller holds them). The
chat model, ``parallel-reason ask`` and the benchmarks all come through here; a closed engine
is replaced on the next call.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import weakref
from typing import Any

from .base import EngineLimits
from .threads import off_main

__all__ = ["DEFAULT_MODEL_NAME", "check_chat_template", "model_name_of", "open_engine"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Reported as the model name when no model is named (the embedded default)."""
_LOCK = threading.RLock()  # guards the tables and serialises loading
# An engine lives as long as a caller holds it (its model is then freed).
_LOADED: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_REMOTE: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
# A remote engine is light (a tokenizer and the server's card) but slow to set up again (the
# tokenizer loads, /models and /metrics are asked: 0.1-0.4 s here): the last few stay held
# when no caller holds them, so a chat model built per call does not pay that every call.
_RECENT_REMOTE: collections.deque[Any] = collections.deque(maxlen=8)


def open_engine(
    model: str | None = None,
    *,
    base_url: str | None = None,
    loaded: tuple[Any, Any] | None = None,
    limits: EngineLimits | None = None,
    name: str | None = None,
    api_key: str | None = None,
    tokenizer: Any = None,
    gguf_file: str | None = None,
    device: str | None = None,
    dtype: str | None = "auto",
    device_map: Any = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Any:
    """The engine for a model name or folder (None: the embedded default), a loaded
    ``(model, tokenizer)``, or a server's ``base_url`` (``model`` is then the served name).

    The first caller's ``limits`` win for a shared engine. Loading settings are those of
    ``loading.load_model_and_tokenizer``; ``trust_remote_code`` stays off unless asked for. A
    model is loaded on a short-lived thread (``threads.off_main``: the engine's forwards run
    faster when no other long-lived thread has run parallel torch work); a ``loaded`` model is
    best loaded the same way.

    Raises:
        ValueError: both ``base_url`` and ``loaded``, a tokenizer without a chat template, or
            a bad loading setting (the message says how to fix it).
    """
    if base_url is not None and loaded is not None:
        msg = "pass base_url (a server) or loaded=(model, tokenizer), not both"
        raise ValueError(msg)
    if base_url is not None:
        return _remote(base_url, model, api_key, tokenizer)
    if loaded is not None:
        lm, tok = loaded
        check_chat_template(tok)
        return engine_for(lm, tok, name or model or model_name_of(lm), limits)
    key = json.dumps(
        [model, gguf_file, device, dtype, device_map, attn_implementation, trust_remote_code],
        sort_keys=True,
        default=str,
    )
    with _LOCK:  # racing first calls all get the one engine: loading holds the lock
        engine = _LOADED.get(key)
        if engine is not None and engine.closed:  # a new engine over the same weights
            engine = engine_for(engine.model, engine.tokenizer, engine.name, limits)
            _LOADED[key] = engine
        if engine is None:
            from ..loading import load_model_and_tokenizer

            # Loaded on a thread that then ends: the caller's thread keeps no OpenMP team,
            # which would throttle the engine thread's (runtime/threads.py).
            lm, tok = off_main(
                load_model_and_tokenizer,
                model,
                gguf_file=gguf_file,
                device=device,
                dtype=dtype,
                device_map=device_map,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                progress=progress,
            )
            check_chat_template(tok)
            engine = engine_for(lm, tok, name or model or DEFAULT_MODEL_NAME, limits)
            _LOADED[key] = engine
        return engine


_BY_MODEL: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def engine_for(model: Any, tokenizer: Any, name: str, limits: EngineLimits | None) -> Any:
    """The one engine of a loaded ``model`` (created on first request): callers that share a
    model share its engine, its batch and its limits (the first caller's limits win)."""
    from .engine import Engine

    with _LOCK:
        engine = _BY_MODEL.get(id(model))
        if engine is None or engine.model is not model or engine.closed:
            import torch

            from .decode_kernel import decode_kernel

            param = next(model.parameters(), None)
            if param is not None and param.dtype == torch.bfloat16 and param.device.type == "cpu":
                # Built (about a second, once per machine) or loaded now, not in a forward.
                decode_kernel()
            engine = Engine(model, tokenizer, name, limits)
            _BY_MODEL[id(model)] = engine
        return engine


def _remote(base_url: str, model: str | None, api_key: str | None, tokenizer: Any) -> Any:
    from .remote import RemoteEngine

    digest = hashlib.sha256((api_key or "").encode()).hexdigest()[:16]  # the key stays secret
    key = json.dumps([base_url.rstrip("/"), model, digest, id(tokenizer) if tokenizer else None])
    with _LOCK:
        engine = _REMOTE.get(key)
        if engine is None:
            engine = RemoteEngine(base_url, model, api_key, tokenizer=tokenizer)
            _REMOTE[key] = engine
        if engine in _RECENT_REMOTE:  # the last used go last: the oldest leaves first
            _RECENT_REMOTE.remove(engine)
        _RECENT_REMOTE.append(engine)
        return engine


def check_chat_template(tokenizer: Any) -> None:
    """Raise, with the fix, unless ``tokenizer`` has a chat template to render messages."""
    if not getattr(tokenizer, "chat_template", None):
        msg = (
            "the tokenizer has no chat_template: ChatParallelReason renders messages with it; "
            "pass a tokenizer that defines one (e.g. an instruct model's tokenizer, or set "
            "tokenizer.chat_template to a Jinja template)"
        )
        raise ValueError(msg)


def model_name_of(model: Any) -> str:
    """A loaded model's name or path, for metadata ("custom" when it has none)."""
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    return str(name) if name else "custom"
