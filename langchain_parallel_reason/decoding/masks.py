"""Belt-like attention masks and position ids for branches decoded inside one sequence.

Contract: every cache column carries ``(branch, position)``; branch -1 is the shared prefix. A
query of branch ``b`` at position ``p`` may attend a column iff the column is prefix, or belongs
to ``b`` at a position ``<= p``; sliding-window layers further require ``p - col_pos < window``
(window measured in positions, not columns). Masks are float and additive (0 attend, dtype-min
block) because transformers adds boolean masks as 0/1 under eager attention (FACTS.md).
``MaskBackend`` is the Stage-2 backend (``attention.AttentionBackend``) that appends the branches
to a stock ``DynamicCache`` and hands these masks to the model's own eager/sdpa attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from .cache import cache_kwarg

__all__ = ["ColumnLayout", "MaskBackend", "belt_allowed", "model_mask_kind", "to_additive"]

PREFIX_BRANCH = -1


def belt_allowed(
    col_branch: torch.Tensor,
    col_pos: torch.Tensor,
    q_branch: torch.Tensor,
    q_pos: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean belt mask.

    Args:
        col_branch, col_pos: ``[K]`` branch id (-1 prefix) and position id of every cache column.
        q_branch, q_pos: ``[Q]`` branch id and position id of every query token.
        sliding_window: if set, a query also needs ``q_pos - col_pos < sliding_window``.

    Returns:
        ``[Q, K]`` bool, True where attention is allowed.
    """
    same = (col_branch[None, :] == q_branch[:, None]) & (col_pos[None, :] <= q_pos[:, None])
    allowed = (col_branch[None, :] == PREFIX_BRANCH) | same
    if sliding_window is not None:
        allowed &= (q_pos[:, None] - col_pos[None, :]) < sliding_window
    return allowed


def to_additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[Q, K]`` bool -> ``[1, 1, Q, K]`` float mask: 0 where allowed, ``finfo(dtype).min`` else."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, blocked)[None, None]


def model_mask_kind(model: torch.nn.Module) -> tuple[str, int | None]:
    """How a model wants its 4D mask.

    Returns ``("dict", window)`` for models whose forward takes a mapping of masks per layer
    type (``config.layer_types``: Gemma2/3, Qwen2/3), ``("single", window)`` for models that take
    one mask (window is the config's sliding window for every layer, e.g. Mistral, Phi3), where
    ``window`` is the sliding window in positions or None.
    """
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        has_sliding = any(t == "sliding_attention" for t in layer_types)
        return "dict", (window if has_sliding else None)
    return "single", window


@dataclass
class ColumnLayout:
    """Branch and position id of every cache column, preallocated and filled by appending.

    ``col_branch``/``col_pos`` are ``[capacity]`` buffers; ``length`` columns are valid. Appending
    writes a slice: no Python loop over the cache length, no reallocation per step.
    """

    col_branch: torch.Tensor
    col_pos: torch.Tensor
    length: int

    @classmethod
    def for_prefix(cls, prefix_len: int, capacity: int, device: torch.device) -> ColumnLayout:
        """Layout holding ``prefix_len`` prefix columns with room for ``capacity`` in all."""
        col_branch = torch.full((capacity,), PREFIX_BRANCH, dtype=torch.long, device=device)
        col_pos = torch.zeros(capacity, dtype=torch.long, device=device)
        col_pos[:prefix_len] = torch.arange(prefix_len, device=device)
        return cls(col_branch, col_pos, prefix_len)

    def append(self, q_branch: torch.Tensor, q_pos: torch.Tensor) -> None:
        """Record the ``[Q]`` new columns written by the next forward pass."""
        end = self.length + q_branch.shape[0]
        if end > self.col_branch.shape[0]:
            msg = f"column layout overflow ({end} > {self.col_branch.shape[0]}): capacity too small"
            raise RuntimeError(msg)
        self.col_branch[self.length : end] = q_branch
        self.col_pos[self.length : end] = q_pos
        self.length = end

    def masks(
        self,
        q_branch: torch.Tensor,
        q_pos: torch.Tensor,
        dtype: torch.dtype,
        kind: str,
        window: int | None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The model-ready 4D additive mask(s) for queries after they were appended.

        Returns one ``[1, 1, Q, K]`` tensor, or a dict keyed by layer type for ``kind == "dict"``.
        """
        cb, cp = self.col_branch[: self.length], self.col_pos[: self.length]
        full = to_additive(belt_allowed(cb, cp, q_branch, q_pos), dtype)
        if window is None:
            return {"full_attention": full, "sliding_attention": full} if kind == "dict" else full
        sliding = to_additive(belt_allowed(cb, cp, q_branch, q_pos, window), dtype)
        if kind == "dict":
            return {"full_attention": full, "sliding_attention": sliding}
        return sliding


class MaskBackend:
    """Branches appended to the caller's ``DynamicCache``, a float 4D belt mask per forward.

    Works for any model whose attention takes a 4D mask (eager, sdpa). Finished branches keep
    their columns (no query attends them again); the caller crops the cache back to the prefix.

    Args:
        model: the causal LM (or an engine's view of it).
        prefix: DynamicCache holding exactly the prefix; branch keys are appended to it.
        capacity: columns the cache will hold at most (prefix + every forced and new token).
        device: where the token tensors go (the input embeddings' device).
    """

    name = "mask"

    def __init__(
        self, model: torch.nn.Module, prefix: DynamicCache, capacity: int, device: torch.device
    ) -> None:
        self.model = model
        self.device = device
        self.cache = prefix
        self.prefix_len = prefix.get_seq_length()
        self.cols = ColumnLayout.for_prefix(self.prefix_len, capacity, device)
        self.kind, self.window = model_mask_kind(model)
        self.dtype = model.get_input_embeddings().weight.dtype
        self.cache_kw = cache_kwarg(model)

    def forward(
        self, branch_ids: list[int], token_idx: list[int], tokens: list[int]
    ) -> torch.Tensor:
        """See ``AttentionBackend.forward``; logits ``[Q, V]``."""
        q_branch = torch.tensor(branch_ids, device=self.device)  # [Q]
        q_pos = torch.tensor(token_idx, device=self.device) + self.prefix_len  # [Q]
        self.cols.append(q_branch, q_pos)
        out = self.model(
            input_ids=torch.tensor(tokens, device=self.device)[None],
            position_ids=q_pos[None],
            attention_mask=self.cols.masks(q_branch, q_pos, self.dtype, self.kind, self.window),
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        return out.logits[0]

    def retire(self, survivors: list[int], lengths: list[int]) -> None:
        """Nothing to move: the mask keeps later queries off a finished branch's columns."""

    def branch_kv(self, branch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """See ``AttentionBackend.branch_kv``: the branch's columns, in the order they were
        appended (= by position), gathered from every layer."""
        idx = (self.cols.col_branch[: self.cols.length] == branch).nonzero().squeeze(1)[:length]
        return [
            (layer.keys.index_select(-2, idx), layer.values.index_select(-2, idx))
            for layer in self.cache.layers
        ]

    def close(self) -> None:
        """Nothing to free: the branch columns go when the caller crops the cache."""
