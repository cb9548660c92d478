"""Stage-2 attention backends, and split (shared-prefix + per-branch) attention for stock models.

Contract: an ``AttentionBackend`` runs the branch loop's forwards (see its docstring);
``SplitBackend`` here and ``masks.MaskBackend`` are the two. ``split_attention`` is registered in transformers' ``AttentionInterface`` as
``"parallel_reason_split"``. During Stage 2 the decoder swaps a model's attention implementation
to it (``use_split_attention``) and passes ``belt_layout=SplitLayout(...)`` to the forward; the
function then attends each query to the shared prefix (keys read once for all queries) and to its
own branch's contiguous keys, joined in one softmax, so no masked key is ever scanned. It honours
``scaling``, ``softcap`` and ``sliding_window`` (in positions) as the stock functions do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache

from .cache import BranchCache, cache_kwarg, prefix_kv
from .masks import model_mask_kind

__all__ = [
    "SPLIT_ATTENTION",
    "AttentionBackend",
    "SplitBackend",
    "SplitLayout",
    "attention_configs",
    "split_attention",
    "use_split_attention",
]

SPLIT_ATTENTION = "parallel_reason_split"


@dataclass
class SplitLayout:
    """Where this forward's queries sit.

    Attributes:
        cache: the Stage-2 BranchCache.
        q_slot: ``[Q]`` slot of each query token. q_idx: ``[Q]`` index inside its branch.
        q_pos: ``[Q]`` position id (prefix_len + q_idx).
        span: keys to read per branch (max branch length after this step's writes).
        contiguous: True when query i is the single token of slot i (a plain decode step), so the
            branch keys are a view of the buffer instead of a gather.
    """

    cache: BranchCache
    q_slot: torch.Tensor
    q_idx: torch.Tensor
    q_pos: torch.Tensor
    span: int
    contiguous: bool


def split_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    belt_layout: SplitLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of ``[1, H, Q, d]`` queries over prefix + own branch. Returns ``[1, Q, H, d]``."""
    if belt_layout is None:
        msg = "parallel_reason_split attention needs belt_layout; it is only valid during Stage 2"
        raise RuntimeError(msg)
    lay = belt_layout
    cache = lay.cache
    layer = module.layer_idx
    heads, q_len, dim = query.shape[1], query.shape[2], query.shape[3]
    kp, vp = prefix_kv(cache.prefix, layer)  # [1, kvh, P, d]
    kvh, plen = kp.shape[1], kp.shape[2]
    group = heads // kvh
    scale = dim**-0.5 if scaling is None else scaling

    # Prefix part: all Q queries share the prefix keys -> one batched matmul per KV head.
    q = query[0].reshape(kvh, group, q_len, dim)  # [kvh, g, Q, d]
    s_pre = torch.matmul(q.reshape(kvh, group * q_len, dim), kp[0].transpose(-1, -2))
    s_pre = s_pre.view(kvh, group, q_len, plen).permute(2, 0, 1, 3)  # [Q, kvh, g, P]

    # Branch part: each query against its own branch's keys [span].
    k_buf, v_buf = cache.keys[layer], cache.values[layer]
    if lay.contiguous:
        kb, vb = k_buf[:q_len, :, : lay.span], v_buf[:q_len, :, : lay.span]  # views
    else:
        kb, vb = k_buf[lay.q_slot, :, : lay.span], v_buf[lay.q_slot, :, : lay.span]
    qb = q.permute(2, 0, 1, 3)  # [Q, kvh, g, d]
    s_br = torch.matmul(qb, kb.transpose(-1, -2))  # [Q, kvh, g, span]

    scores = torch.cat([s_pre, s_br], dim=-1).float() * scale  # [Q, kvh, g, P + span]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    idx = torch.arange(lay.span, device=query.device)
    allowed_br = idx[None, :] <= lay.q_idx[:, None]  # [Q, span] causal inside the branch
    if sliding_window is not None:
        # Positions, not columns: branch key j sits at prefix_len + j.
        allowed_br &= (lay.q_pos[:, None] - (plen + idx)[None, :]) < sliding_window
        pre_pos = torch.arange(plen, device=query.device)
        allowed_pre = (lay.q_pos[:, None] - pre_pos[None, :]) < sliding_window  # [Q, P]
    else:
        allowed_pre = torch.ones(q_len, plen, dtype=torch.bool, device=query.device)
    allowed = torch.cat([allowed_pre, allowed_br], dim=-1)[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1).to(vp.dtype)

    p_pre = probs[..., :plen].permute(1, 2, 0, 3).reshape(kvh, group * q_len, plen)
    out_pre = torch.matmul(p_pre, vp[0]).view(kvh, group, q_len, dim).permute(2, 0, 1, 3)
    out_br = torch.matmul(probs[..., plen:], vb)  # [Q, kvh, g, d]
    out = (out_pre + out_br).reshape(q_len, heads, dim)
    return out.unsqueeze(0), None


AttentionInterface.register(SPLIT_ATTENTION, split_attention)


def attention_configs(model: torch.nn.Module) -> list:
    """Every distinct config object an attention module may read `_attn_implementation` from.

    Walks every module (milliseconds on a small model): collect once per decode call.
    """
    seen: dict[int, object] = {id(model.config): model.config}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextlib.contextmanager
def use_split_attention(
    model: torch.nn.Module, configs: Sequence[Any] | None = None
) -> Iterator[None]:
    """Route the model's attention through ``split_attention`` inside the block, then restore.

    ``configs``: the model's ``attention_configs``, collected once by a caller that enters this
    block on every forward (None walks the model now). Callers must not run other forwards on
    the same model concurrently. A model that batches its forwards (an engine's view,
    ``batches_forwards``) is left alone: its scheduler selects the attention of each call.
    """
    if getattr(model, "batches_forwards", False):
        # An engine's view of the model: its scheduler picks the attention per call.
        yield
        return
    configs = attention_configs(model) if configs is None else configs
    saved = [cfg._attn_implementation for cfg in configs]
    try:
        for cfg in configs:
            cfg._attn_implementation = SPLIT_ATTENTION
        yield
    finally:
        for cfg, impl in zip(configs, saved, strict=True):
            cfg._attn_implementation = impl


class AttentionBackend(Protocol):
    """How the branch loop runs its Stage-2 forwards; one object per ``iter_decode_branches`` call.

    ``forward(branch_ids, token_idx, tokens)`` feeds Q tokens in ONE forward: token i is number
    ``token_idx[i]`` (forced tokens counted from 0) of branch ``branch_ids[i]``, at position
    ``prefix_len + token_idx[i]``; it attends the prefix and tokens ``0..token_idx[i]`` of its
    own branch only, and its keys are kept for the branch's later tokens. Returns logits
    ``[Q, V]``. ``retire(survivors, lengths)`` follows every step that ended branches: the live
    branch ids in order and the tokens each holds. ``branch_kv(branch, length)`` copies a
    branch's first ``length`` keys/values (called when it ends, before ``retire``). ``close()`` frees the branch keys at the end
    (the caller crops the prefix cache back). ``cache`` holds the keys (``kv_bytes`` reads it).
    """

    name: str
    cache: Cache

    def forward(
        self, branch_ids: list[int], token_idx: list[int], tokens: list[int]
    ) -> torch.Tensor:
        """Run one forward over the given branch tokens; return their logits ``[Q, V]``."""

    def retire(self, survivors: list[int], lengths: list[int]) -> None:
        """Forget the branches that ended (``survivors`` are the live ones, in order)."""

    def branch_kv(self, branch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of ``branch``'s first ``length`` keys/values: per layer ``[1, kv_heads,
        length, head_dim]`` each, token k at position ``prefix_len + k``."""

    def close(self) -> None:
        """Free what the backend allocated."""


class SplitBackend:
    """Split attention over a ``BranchCache``: live branch i sits in slot i.

    The prefix keys are read in place (never copied, never masked); the model's attention
    implementation is switched to ``split_attention`` around each forward, over configs
    collected once here (walking the modules per forward cost 2.5-3.4 ms on a 135M model).

    Args:
        model: the causal LM (or an engine's view of it).
        prefix: DynamicCache holding exactly the prefix.
        num_branches: branches decoded at once (slots).
        max_len: most tokens any branch holds (forced + new).
        device: where the token tensors go (the input embeddings' device).
    """

    name = "split"

    def __init__(
        self,
        model: torch.nn.Module,
        prefix: DynamicCache,
        num_branches: int,
        max_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.device = device
        self.cache = BranchCache(prefix, num_slots=num_branches, max_len=max_len)
        self.slot_of = list(range(num_branches))  # branch id -> slot
        self.live = num_branches
        # An engine's view picks the attention itself: nothing to switch.
        self.configs = [] if getattr(model, "batches_forwards", False) else attention_configs(model)
        self.cache_kw = cache_kwarg(model)
        # The model's mask builder is skipped (split_attention ignores it): a [1,1,1,1] dummy.
        dummy = torch.zeros(1, 1, 1, 1, device=device)
        kind, _ = model_mask_kind(model)
        self.mask = (
            {"full_attention": dummy, "sliding_attention": dummy} if kind == "dict" else dummy
        )

    def forward(
        self, branch_ids: list[int], token_idx: list[int], tokens: list[int]
    ) -> torch.Tensor:
        """See ``AttentionBackend.forward``; logits ``[Q, V]``."""
        q_idx = torch.tensor(token_idx, device=self.device)  # [Q]
        q_pos = q_idx + self.cache.prefix_len  # [Q]
        q_slot = torch.tensor([self.slot_of[b] for b in branch_ids], device=self.device)
        self.cache.write_slot, self.cache.write_idx = q_slot, q_idx
        # A plain decode step (token i is the one token of slot i) reads the buffers as views.
        contiguous = len(branch_ids) == self.live and all(
            self.slot_of[b] == i for i, b in enumerate(branch_ids)
        )
        layout = SplitLayout(self.cache, q_slot, q_idx, q_pos, max(token_idx) + 1, contiguous)
        with use_split_attention(self.model, self.configs):
            out = self.model(
                input_ids=torch.tensor(tokens, device=self.device)[None],
                position_ids=q_pos[None],
                attention_mask=self.mask,
                use_cache=True,
                belt_layout=layout,
                **{self.cache_kw: self.cache},
            )
        return out.logits[0]

    def retire(self, survivors: list[int], lengths: list[int]) -> None:
        """Pack the survivors to the front: one slot copy per branch that moves, not per step."""
        for i, (b, length) in enumerate(zip(survivors, lengths, strict=True)):
            if self.slot_of[b] != i:
                self.cache.move_slot(self.slot_of[b], i, length)
                self.slot_of[b] = i
        self.live = len(survivors)

    def branch_kv(self, branch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """See ``AttentionBackend.branch_kv`` (a copy: the slot is reused once it retires)."""
        return self.cache.slot_kv(self.slot_of[branch], length)

    def close(self) -> None:
        """Drop the branch buffers (the prefix they reference is the caller's)."""
        self.cache.keys.clear()
        self.cache.values.clear()
