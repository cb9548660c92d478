"""KV layers the engine gives the caches it serves: written in place, no copy per step.

Contract: a stock ``DynamicLayer`` concatenates every step's keys onto the whole cache, so a
decode step copies each live request's entire KV once per layer; with 16 requests that is
hundreds of MB per step on a CPU. ``SlabLayer`` keeps ``keys``/``values`` as ``[1, kvh, L, d]``
views of a buffer with room to grow (capacity doubles when full, so a sequence of length L is
copied O(log L) times in all): an update writes only the new tokens. ``adopt_slabs(cache)`` makes
an empty ``DynamicCache`` grow slab layers; the pipeline's code sees an ordinary DynamicCache.

Views handed out earlier stay valid for the tokens they cover, except after ``crop``: tokens
written after a crop overwrite the cropped ones in place (the pipeline never reads a view of
cropped tokens; the prefix cache copies what it stores).

``KVPool`` goes one step further for half precision with sdpa: every cache the engine serves
leases a slot of one buffer per layer (``PoolLayer``), so ragged attention can run the short
segments of a step (one-token decode rows, Stage-2 belt rows, short feeds) as one attention call
per run of slots over a view of the pool (``runtime/ragged.py``).
A pooled cache's views stay valid the same way, as long as the cache is alive (a collected cache's
slot goes to the next one).
"""

from __future__ import annotations

import heapq
import threading
import time
import weakref
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["KVPool", "KVPools", "PoolLayer", "SlabLayer", "adopt_slabs"]

_MIN_CAPACITY = 64
# A KVPool's first buffers: 8 caches of 512 tokens (47 MB for the embedded model in bfloat16).
_POOL_SLOTS, _POOL_TOKENS = 8, 512


class SlabLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of a growing buffer (see module)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k: torch.Tensor | None = None  # [1, kvh, capacity, d]
        self._v: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[1, kvh, S, d]`` new keys/values after the cached ones; return all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        have = self.get_seq_length()
        need = have + key_states.shape[-2]
        if self._k is None or need > self._k.shape[-2]:
            capacity = max(_MIN_CAPACITY, 1 << (need - 1).bit_length())
            shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
            k = key_states.new_empty(shape)
            v = value_states.new_empty((*shape[:3], value_states.shape[-1]))
            if have:
                k[:, :, :have] = self.keys
                v[:, :, :have] = self.values
            self._k, self._v = k, v
        self._k[:, :, have:need] = key_states
        self._v[:, :, have:need] = value_states
        self.keys = self._k[:, :, :need]
        self.values = self._v[:, :, :need]
        return self.keys, self.values

    def reset(self) -> None:
        """Drop the buffers too."""
        self._k = self._v = None
        super().reset()


def adopt_slabs(cache: DynamicCache, pool: KVPool | None = None) -> None:
    """Make an empty, config-less ``DynamicCache`` create ``PoolLayer`` layers in a slot of
    ``pool`` (when given and not full), else ``SlabLayer`` layers (else no-op)."""
    if (
        type(cache) is DynamicCache
        and not cache.layers
        and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer
    ):
        lease = None if pool is None else pool.lease()
        cache.layer_class_to_replicate = SlabLayer if lease is None else lease


class KVPool:
    """Slots of one zero-initialised buffer per layer, ``[slots, kvh, capacity, d]`` keys and
    values, for the caches of one engine (``adopt_slabs(cache, pool)``).

    Why: a decode step's short segments then sit in one tensor, and ``attend_pooled`` runs
    one attention call per run of slots over the view ``[a:b, :, :L]`` (no copy) instead of one
    call per segment. On this 2-core CPU a one-token SDPA call over 600 bfloat16 keys costs about
    40 us of per-call work besides its ~44 us of reading keys: alone, 12 segments cost 995 us a
    layer one by one and 565 us in one call. Inside a step the keys are cold and the gain is
    smaller: a 12-segment step's attention 34 -> 26 ms (docs/profile.md).

    Slots are leased per cache (``lease``) and come back when the lease is collected (the cache
    and all its layers gone). The buffers grow by doubling (slots and capacity); ``trim`` drops
    them once no lease has been live for ``keep_s`` seconds, so an idle engine holds no KV while
    bursts of calls close together reuse them (fresh memory costs: allocating the buffers of a
    16-call burst took 0.29 s on this machine, 3% of the burst). A cache longer than
    ``max_capacity`` leaves the pool (its layers copy out to private slabs); more than
    ``max_slots`` live caches get private slabs too. Leasing is thread-safe (a lease may be
    collected on any thread); buffers are only touched, and trimmed, by the thread that runs
    forwards.
    """

    def __init__(self, max_slots: int = 64, max_capacity: int = 2048, keep_s: float = 30.0) -> None:
        self.max_slots, self.max_capacity, self.keep_s = max_slots, max_capacity, keep_s
        self._lock = threading.Lock()
        self._free: list[int] = []  # a heap: the lowest free slot first, so live slots pack
        self._next = 0  # slots handed out so far (free or not)
        self._live = 0
        self._idle_since = time.monotonic()
        self.k: dict[int, torch.Tensor] = {}  # layer -> [slots, kvh, capacity, d]
        self.v: dict[int, torch.Tensor] = {}

    def lease(self) -> _Lease | None:
        """A free slot for one cache, or None when ``max_slots`` are live."""
        with self._lock:
            if self._free:
                slot = heapq.heappop(self._free)
            elif self._next < self.max_slots:
                slot, self._next = self._next, self._next + 1
            else:
                return None
            self._live += 1
        lease = _Lease(self, slot)
        weakref.finalize(lease, self._release, slot)
        return lease

    def _release(self, slot: int) -> None:
        with self._lock:
            self._live -= 1
            heapq.heappush(self._free, slot)
            if self._live == 0:
                self._idle_since = time.monotonic()

    def trim(self) -> float | None:
        """Drop the buffers when no lease has been live for ``keep_s`` (views handed out keep
        their memory). Returns the seconds left until then, or None when there is nothing to
        drop or a lease is live."""
        with self._lock:
            if self._live or not self.k:
                return None
            left = self._idle_since + self.keep_s - time.monotonic()
            if left > 0:
                return left
            self.k, self.v, self._free, self._next = {}, {}, [], 0
            return None

    def room(
        self, layer: int, slot: int, need: int, like_k: torch.Tensor, like_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer ``layer``'s buffers with room for ``need`` tokens in ``slot`` (grown by
        doubling, contents kept), or None when ``need`` exceeds ``max_capacity``."""
        if need > self.max_capacity:
            return None
        k, v = self.k.get(layer), self.v.get(layer)
        if k is not None and slot < k.shape[0] and need <= k.shape[2]:
            return k, v
        # Each growth copies the whole buffer: start where a burst of chat calls usually ends.
        slots = max(_POOL_SLOTS, _pow2(max(self._next, slot + 1)), 0 if k is None else k.shape[0])
        cap = max(_POOL_TOKENS, _pow2(need), 0 if k is None else k.shape[2])
        like_k, like_v = (like_k, like_v) if k is None else (k, v)  # keys and values may differ
        new_k = like_k.new_zeros((slots, like_k.shape[1], cap, like_k.shape[-1]))
        new_v = like_v.new_zeros((slots, like_v.shape[1], cap, like_v.shape[-1]))
        if k is not None:
            new_k[: k.shape[0], :, : k.shape[2]] = k
            new_v[: v.shape[0], :, : v.shape[2]] = v
        self.k[layer], self.v[layer] = new_k, new_v
        return new_k, new_v

    def stats(self) -> dict[str, int]:
        """Live leases, and the bytes the buffers hold."""
        held = sum(t.numel() * t.element_size() for t in [*self.k.values(), *self.v.values()])
        return {"kv_pool_leases": self._live, "kv_pool_bytes": held}


class KVPools:
    """One ``KVPool`` per class of prompt length, so caches side by side in a pool hold about as
    many tokens: an attention call over a run of slots reads every slot up to the run's longest
    cache, and a chat call's 34-token cache next to a planning call's 300-token one wasted half
    the keys read in a 16-call burst. Classes: a first forward of < 128, < 512, or more tokens.
    """

    BOUNDS = (128, 512)

    def __init__(self, **limits: Any) -> None:
        self.pools = [KVPool(**limits) for _ in range(len(self.BOUNDS) + 1)]

    def for_prompt(self, tokens: int) -> KVPool:
        """The pool for a cache whose first forward has ``tokens`` tokens."""
        return self.pools[sum(tokens >= bound for bound in self.BOUNDS)]

    @property
    def keep_s(self) -> float:
        """Seconds the buffers stay after their pool's last lease (``KVPool.trim``)."""
        return self.pools[0].keep_s

    @keep_s.setter
    def keep_s(self, seconds: float) -> None:
        for pool in self.pools:
            pool.keep_s = seconds

    def trim(self) -> float | None:
        """``KVPool.trim`` on each pool: the soonest seconds left, or None."""
        left = [t for t in (pool.trim() for pool in self.pools) if t is not None]
        return min(left, default=None)

    def stats(self) -> dict[str, int]:
        """Live leases and the bytes held, over all pools."""
        each = [pool.stats() for pool in self.pools]
        return {key: sum(s[key] for s in each) for key in each[0]}


class _Lease:
    """One cache's slot in a ``KVPool``: the slot is free again once this object is collected."""

    __slots__ = ("__weakref__", "count", "pool", "slot")

    def __init__(self, pool: KVPool, slot: int) -> None:
        self.pool, self.slot, self.count = pool, slot, 0

    def __call__(self) -> PoolLayer:
        # DynamicCache appends its layers in order (Cache.update), so the n-th call makes layer n.
        self.count += 1
        return PoolLayer(self, self.count - 1)

    def __deepcopy__(self, memo: dict[int, Any]) -> type[SlabLayer]:
        # A copied cache must not share the slot: its new layers are private slabs.
        return SlabLayer


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class PoolLayer(SlabLayer):
    """A ``DynamicLayer`` whose keys/values live in its cache's ``KVPool`` slot.

    ``keys``/``values`` are ``[1, kvh, L, d]`` views of the slot, made on access (the buffers may
    have grown since). Assigning them (a crop: a shorter view of the slot) only sets the length;
    any other tensor is copied into the slot. A layer that cannot stay (longer than the pool's
    capacity, a batch of more than one sequence) copies itself out and goes on as a
    ``SlabLayer``.
    """

    def __init__(self, lease: _Lease, index: int) -> None:
        self._lease: _Lease | None = lease
        self.index = index  # the model layer this is: its buffers in the pool
        # Tokens held, for keys and values apart: a crop assigns one, then slices the other.
        self._lengths = [0, 0]
        self._keys: torch.Tensor | None = None  # private storage, once out of the pool
        self._values: torch.Tensor | None = None
        super().__init__()

    @property
    def length(self) -> int:
        """Cached tokens (while ``pooled``)."""
        return self._lengths[0]

    @length.setter
    def length(self, n: int) -> None:
        self._lengths[0] = self._lengths[1] = n

    @property
    def pooled(self) -> bool:
        """Whether the keys/values live in the pool (else in a private slab)."""
        return self._lease is not None

    @property
    def slot(self) -> int:
        """The pool slot (only while ``pooled``)."""
        return self._lease.slot

    def _view(self, bufs: dict[int, torch.Tensor], key: bool) -> Any:
        if not self.is_initialized:
            return None
        buf = bufs.get(self.index)
        if buf is None:
            return self._empty
        return buf[self.slot : self.slot + 1, :, : self._lengths[0 if key else 1]]

    def _assign(self, value: torch.Tensor | None, bufs: dict[int, torch.Tensor], key: bool) -> None:
        if self._lease is None:
            if key:
                self._keys = value
            else:
                self._values = value
            return
        which = 0 if key else 1
        if value is None or value.numel() == 0:
            self._lengths[which] = 0
            if value is not None:
                self._empty = value
            return
        buf = bufs.get(self.index)
        if (
            buf is not None
            and value.data_ptr() == buf[self.slot].data_ptr()
            and value.stride() == buf[self.slot : self.slot + 1].stride()
        ):
            self._lengths[which] = value.shape[-2]  # a crop: a view of the slot's first tokens
            return
        n = value.shape[-2]
        room = None
        # Only into buffers an update made (keys and values may differ in shape): else leave.
        if value.shape[0] == 1 and buf is not None and buf.shape[1::2] == value.shape[1::2]:
            pool = self._lease.pool
            room = pool.room(self.index, self.slot, max(n, *self._lengths), value, value)
        if room is None:
            self._leave()
            self._assign(value, bufs, key)
            return
        room[which][self.slot, :, :n] = value[0]
        self._lengths[which] = n

    keys = property(
        lambda self: self._view(self._lease.pool.k, True) if self._lease else self._keys,
        lambda self, value: self._assign(value, self._lease.pool.k if self._lease else {}, True),
    )
    values = property(
        lambda self: self._view(self._lease.pool.v, False) if self._lease else self._values,
        lambda self, value: self._assign(value, self._lease.pool.v if self._lease else {}, False),
    )

    def _leave(self) -> None:
        """Copy the tokens out to private storage and give up the pool (for this layer)."""
        keys, values = self.keys, self.values
        self._lease = None
        self._keys = None if keys is None else keys.clone()
        self._values = None if values is None else values.clone()
        self._k = self._v = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._empty = key_states.new_empty((1, key_states.shape[1], 0, key_states.shape[-1]))
        super().lazy_initialization(key_states, value_states)

    def get_seq_length(self) -> int:
        """Cached tokens (the length, without making a view)."""
        if self._lease is None:
            return super().get_seq_length()
        return self.length if self.is_initialized else 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[1, kvh, S, d]`` new keys/values into the slot; return all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._lease is not None:
            have = self.length
            need = have + key_states.shape[-2]
            slot = self.slot
            room = None
            if key_states.shape[0] == 1:
                room = self._lease.pool.room(self.index, slot, need, key_states, value_states)
            if room is not None:
                k, v = room
                k[slot, :, have:need] = key_states[0]
                v[slot, :, have:need] = value_states[0]
                self.length = need
                return k[slot : slot + 1, :, :need], v[slot : slot + 1, :, :need]
            self._leave()
        return super().update(key_states, value_states, *args, **kwargs)

    def reset(self) -> None:
        """Back to empty (the slot stays leased)."""
        self.length = 0
        super().reset()

    def __deepcopy__(self, memo: dict[int, Any]) -> SlabLayer:
        # A copy owns its tokens: a private slab with the same keys/values.
        copy = SlabLayer()
        if self.is_initialized:
            copy.lazy_initialization(self.keys, self.values)
            if self.get_seq_length():
                copy.update(self.keys.clone(), self.values.clone())
        return copy
