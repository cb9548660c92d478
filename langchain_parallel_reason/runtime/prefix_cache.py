"""A radix tree of prompt KV shared across requests (automatic prefix caching).

Contract: ``PrefixCache(max_bytes)`` stores the keys/values of prompts the engine has prefilled,
as a radix tree over token ids (as SGLang's RadixAttention; vLLM's automatic prefix caching does
the same with hashed blocks). ``match(ids)`` returns the longest stored prefix of ``ids`` as
per-layer ``[1, kv_heads, M, head_dim]`` tensors (fresh copies: the caller may grow or crop
them), ``insert(ids, layers)`` stores a prefill's KV for ``ids``. Requests that share a system
prompt (every planning prompt shares the Stage-1 instructions; tool calls share the tool list)
then prefill only what differs. The KV of token j depends on tokens 0..j only (causal
attention), so a stored prefix is exactly what the request would compute itself.

Each node owns its segment's tensors (cloned from the prefilled cache, so evicting a node frees
them); a node split at a new branching point copies its two halves. Least recently used leaves
are evicted beyond ``max_bytes``. Thread-safe (workers match and insert; one lock).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

import torch

__all__ = ["PrefixCache", "common_prefix"]

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: ([1, kvh, S, d] keys, values)


class _Node:
    __slots__ = ("children", "ids", "kv", "last_used", "parent")

    def __init__(self, ids: tuple[int, ...], kv: KV, parent: _Node | None) -> None:
        self.ids = ids
        self.kv = kv
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.last_used = 0

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _slice(kv: KV, start: int, stop: int | None = None) -> KV:
    # [1, kvh, S, d] -> [1, kvh, stop - start, d], with its own storage.
    return [(k[:, :, start:stop].clone(), v[:, :, start:stop].clone()) for k, v in kv]


class PrefixCache:
    """Prompt KV shared across requests; see the module docstring.

    Args:
        max_bytes: most bytes of keys/values kept (0 disables the cache).
        min_tokens: shortest prefix worth reusing (shorter matches are ignored).
    """

    def __init__(self, max_bytes: int, min_tokens: int = 16) -> None:
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._root = _Node((), [], None)
        self._lock = threading.Lock()
        self._clock = itertools.count(1)
        self.nbytes = 0
        self.hit_tokens = 0
        self.lookups = 0

    def longest(self, ids: Sequence[int], limit: int | None = None) -> int:
        """How many leading tokens of ``ids`` (at most ``limit``) are stored; copies nothing."""
        if self.max_bytes <= 0:
            return 0
        with self._lock:
            return sum(used for _, used in self._walk(ids, limit))

    def match(self, ids: Sequence[int], limit: int | None = None) -> tuple[int, KV | None]:
        """The longest stored prefix of ``ids`` (at most ``limit`` tokens): ``(M, kv)`` with
        per-layer ``[1, kvh, M, d]`` copies, or ``(0, None)`` below ``min_tokens``."""
        if self.max_bytes <= 0:
            return 0, None
        with self._lock:
            self.lookups += 1
            path = self._walk(ids, limit)
            hit = sum(used for _, used in path)
            if hit < self.min_tokens:
                return 0, None
            tick = next(self._clock)
            for n, _ in path:
                n.last_used = tick
            kv = [
                (
                    torch.cat([n.kv[i][0][:, :, :used] for n, used in path], dim=2),
                    torch.cat([n.kv[i][1][:, :, :used] for n, used in path], dim=2),
                )
                for i in range(len(path[0][0].kv))
            ]
            self.hit_tokens += hit
            return hit, kv

    def _walk(self, ids: Sequence[int], limit: int | None) -> list[tuple[_Node, int]]:
        """The nodes matching ``ids[:limit]`` from the root, with how many tokens of each."""
        limit = len(ids) if limit is None else min(limit, len(ids))
        path: list[tuple[_Node, int]] = []
        node, at = self._root, 0
        while at < limit:
            child = node.children.get(ids[at])
            if child is None:
                break
            used = common_prefix(child.ids, ids[at:limit])
            path.append((child, used))
            at += used
            if used < len(child.ids):
                break
            node = child
        return path

    def insert(self, ids: Sequence[int], kv: KV) -> None:
        """Store the KV of ``ids`` (per-layer tensors holding at least ``len(ids)`` tokens)."""
        if self.max_bytes <= 0 or len(ids) < self.min_tokens or not kv:
            return
        ids = tuple(int(i) for i in ids)
        with self._lock:
            tick = next(self._clock)
            node, at = self._root, 0
            while at < len(ids):
                child = node.children.get(ids[at])
                if child is None:
                    leaf = _Node(ids[at:], _slice(kv, at, len(ids)), node)
                    leaf.last_used = tick
                    node.children[ids[at]] = leaf
                    self.nbytes += leaf.nbytes()
                    break
                used = common_prefix(child.ids, ids[at:])
                if used < len(child.ids):
                    child = self._split(child, used)
                child.last_used = tick
                node, at = child, at + used
            self._evict()

    def _split(self, node: _Node, used: int) -> _Node:
        """Cut ``node`` after ``used`` tokens; returns the new upper half (same bytes)."""
        upper = _Node(node.ids[:used], _slice(node.kv, 0, used), node.parent)
        upper.last_used = node.last_used
        node.parent.children[node.ids[0]] = upper
        node.ids = node.ids[used:]
        node.kv = _slice(node.kv, used)
        node.parent = upper
        upper.children[node.ids[0]] = node
        return upper

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes:
            leaves = [n for n in self._nodes() if not n.children]
            if not leaves:
                return
            victim = min(leaves, key=lambda n: n.last_used)
            del victim.parent.children[victim.ids[0]]
            self.nbytes -= victim.nbytes()

    def _nodes(self) -> list[_Node]:
        out, todo = [], list(self._root.children.values())
        while todo:
            n = todo.pop()
            out.append(n)
            todo.extend(n.children.values())
        return out

    def stats(self) -> dict[str, int]:
        """Bytes held, nodes, lookups and tokens served from the cache so far."""
        with self._lock:
            return {
                "prefix_cache_bytes": self.nbytes,
                "prefix_cache_nodes": len(self._nodes()),
                "prefix_cache_lookups": self.lookups,
                "prefix_cache_hit_tokens": self.hit_tokens,
            }

    def clear(self) -> None:
        """Drop every stored prefix."""
        with self._lock:
            self._root = _Node((), [], None)
            self.nbytes = 0
