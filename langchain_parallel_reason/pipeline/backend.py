"""What the stages ask of a backend, and the in-process backend over a transformers model.

Contract: the stages (route, plan, steps, conclusion, blocks) are written once, against a
``Backend``: caches that hold a sequence's token ids, feeding ids into a cache, cutting a cache
back, and decoding after a cache (one continuation, or N branches over a shared prefix under
the belt mask), under the decode settings of ``decoding`` (sampling, stop ids and strings, the
loop guard, first-token bans, repetition controls, a grammar). ``LocalBackend`` runs them on a
model in this process; a ``machine.RequestMachine`` runs them as actions for a driver, its
"cache" the list of ids the next decode sends as its context: runtime/http.py (streamed
completions on an OpenAI-compatible server) or runtime/local_driver.py (``LocalBackend`` on the
engine's view of the model, whose forwards the engine batches). Both end a branch with the same stop rules (``decoding.stops.Stopping``), so
the guards hold on every backend.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from typing import Any, Protocol

import torch
from transformers.cache_utils import DynamicCache

from ..decoding.cache import crop_to
from ..decoding.decoder import BranchesOutput, StepEvent, iter_decode_branches, model_device
from ..decoding.sequential import SequentialResult, forward_tokens, iter_decode
from .render import context_window, stop_token_ids

__all__ = ["Backend", "LocalBackend", "as_backend"]


class Backend(Protocol):
    """The operations the stages use (see the module docstring)."""

    name: str
    """How the steps are decoded, for the report ("split", "mask" or "server ...")."""
    device: torch.device
    """Where logits live (the CPU for a server)."""
    context_window: int
    """Most tokens a sequence may hold."""
    stop_ids: list[int]
    """Token ids that end an answer (EOS)."""
    vocab_size: int
    """Size of the logits' last dimension."""
    longer_context: str
    """How to get a longer context window (for the error of a prompt that does not fit)."""

    def new_cache(self) -> Any:
        """An empty cache (``get_seq_length()`` gives the tokens it holds)."""
        ...

    def forward_tokens(self, ids: Sequence[int], cache: Any, start: int) -> torch.Tensor | None:
        """Feed ``ids`` at positions ``start..`` into ``cache``; the logits ``[V]`` after the
        last, or None where the backend computes them only when it decodes (a server)."""
        ...

    def crop(self, cache: Any, length: int) -> None:
        """Keep the first ``length`` tokens of ``cache``."""
        ...

    def iter_decode(
        self, input_ids: Sequence[int], cache: Any, **kwargs: Any
    ) -> Generator[int, None, SequentialResult]:
        """``decoding.sequential.iter_decode`` on this backend (same arguments, no model)."""
        ...

    def iter_decode_branches(
        self, prefix_ids: Sequence[int], branch_prefixes: Sequence[Sequence[int]], **kwargs: Any
    ) -> Generator[StepEvent, None, BranchesOutput]:
        """``decoding.decoder.iter_decode_branches`` on this backend (same arguments)."""
        ...

    def grammar(self, *, ebnf: str | None = None, json_schema: Any = None) -> Any:
        """A grammar constraint for ``iter_decode`` (an EBNF grammar or a JSON schema)."""
        ...

    def kv_reuse_problem(self) -> str | None:
        """Why Stage 3 cannot reuse the steps' own KV here (None: it can)."""
        ...

    def lay_out_branches(self, cache: Any, kvs: Any, glue_ids: Any, cancel: Any) -> Any:
        """``decoding.merge.lay_out_branches`` (only where ``kv_reuse_problem`` is None)."""
        ...


class LocalBackend:
    """The stages' operations on a transformers model in this process (or the engine's view
    of one, which batches the forwards of many requests)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = "local"
        self.longer_context = "use a model with a longer context"
        self.device = model_device(model)
        self.context_window = context_window(model)
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])

    def new_cache(self) -> DynamicCache:
        """An empty ``DynamicCache``."""
        return DynamicCache()

    def forward_tokens(self, ids: Sequence[int], cache: Any, start: int) -> torch.Tensor:
        """One forward over ``ids``; the logits ``[V]`` after the last."""
        with torch.inference_mode():
            return forward_tokens(
                self.model, torch.tensor(list(ids), device=self.device), cache, start
            )

    def crop(self, cache: Any, length: int) -> None:
        """Drop the KV of every token after the first ``length``."""
        crop_to(cache, length)

    def iter_decode(self, input_ids: Sequence[int], cache: Any, **kwargs: Any) -> Generator:
        """``decoding.sequential.iter_decode`` on the model."""
        return iter_decode(self.model, input_ids, cache, **kwargs)

    def iter_decode_branches(
        self, prefix_ids: Sequence[int], branch_prefixes: Sequence[Sequence[int]], **kwargs: Any
    ) -> Generator:
        """``decoding.decoder.iter_decode_branches`` on the model (under the row cap of an
        engine's view, where there is one)."""
        kwargs.setdefault("max_rows", getattr(self.model, "max_rows", None))
        return iter_decode_branches(self.model, prefix_ids, branch_prefixes, **kwargs)

    def grammar(self, *, ebnf: str | None = None, json_schema: Any = None, **kw: Any) -> Any:
        """An xgrammar constraint compiled for the tokenizer (masks logits per token)."""
        # Imported on first use: xgrammar is only needed when something is constrained.
        from ..decoding.constraints import GrammarConstraint

        kw = {"vocab_size": self.vocab_size, **kw}
        if json_schema is not None:
            return GrammarConstraint.from_json_schema(self.tokenizer, json_schema, **kw)
        return GrammarConstraint.from_ebnf(self.tokenizer, ebnf, **kw)

    def kv_reuse_problem(self) -> str | None:
        """What keeps this model from re-positioning cached keys (``decoding.merge``)."""
        from ..decoding.merge import kv_reuse_problem

        return kv_reuse_problem(self.model)

    def lay_out_branches(
        self, cache: Any, kvs: Any, glue_ids: Any, cancel: threading.Event | None
    ) -> Any:
        """The steps' own KV laid out after the prefix (``decoding.merge``)."""
        from ..decoding.merge import lay_out_branches

        return lay_out_branches(self.model, cache, kvs, glue_ids, cancel=cancel)


def as_backend(model_or_backend: Any, tokenizer: Any) -> Any:
    """A backend for the stages: a model is wrapped in ``LocalBackend``; a backend as is."""
    if isinstance(model_or_backend, torch.nn.Module) or hasattr(
        model_or_backend, "get_output_embeddings"
    ):
        return LocalBackend(model_or_backend, tokenizer)
    return model_or_backend
