"""Decode attention over the KV pool, in C (``csrc/decode_attention.c``), built once per machine.

Contract: ``decode_kernel()`` returns the loaded ``DecodeKernel``, or None where it cannot be
had; ``kernel_problem()`` then says why (no C compiler, the build failed, turned off with
``PARALLEL_REASON_DECODE_KERNEL=0``). ``DecodeKernel.attend`` runs bfloat16 query rows over
their pool slots' keys (see its docstring); the engine's pooled attention
(``ragged.attend_pooled``) takes it where it is had and the dtype is bfloat16, and runs
torch's ``scaled_dot_product_attention`` per run of slots otherwise. Results agree with that
path up to bfloat16 rounding of the output (both accumulate in float32).

Why C and not a library: the step's short segments need one to eight query rows each over
their own cache, which torch's CPU flash kernel handles slowly (it tiles for long query
blocks), and no maintained library offers CPU decode attention for this torch: Intel's
extension pins an older torch, vLLM's and SGLang's CPU kernels ship only inside those servers.
The kernel is 200 lines of plain C with no torch headers, so it builds in about a second with
the system's C compiler (torch's own C++ extension builder needs ninja and half a minute).

Build: ``$CC`` or ``cc``/``gcc`` on the PATH, ``-O3 -march=native`` (the library is built on the
machine that runs it and cached under ``default_cache_dir()/kernels``, its name a hash of the
source, the flags, the compiler and the CPU), ``-ffast-math`` so the softmax's ``expf``
vectorises (glibc's libmvec; the source keeps to finite numbers; linked in a second step
without it, so gcc's ``crtfastmath.o`` does not switch the whole process to flush-to-zero),
and ``-fopenmp``: the library
links ``libgomp.so.1``, which the dynamic loader resolves to the copy torch already loaded, so
its loop runs on the calling thread's OpenMP team (runtime/threads.py says why one team
matters). Concurrent builds write to temporary names and rename atomically.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["DecodeKernel", "decode_kernel", "kernel_problem"]

_SOURCE = Path(__file__).with_name("csrc") / "decode_attention.c"
_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11")
# Linked without -ffast-math: with it, gcc links crtfastmath.o, whose constructor turns on
# flush-to-zero for the whole process at load (5e-324 would read as 0 everywhere after).
_LINK = ("-shared", "-fopenmp")
_SWITCH = "PARALLEL_REASON_DECODE_KERNEL"

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "kernel": DecodeKernel | None, "problem": str | None


class DecodeKernel:
    """The loaded library (``decode_kernel()`` makes the one instance)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))  # CDLL: the GIL is released during each call
        fn = lib.pr_decode_attention
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, i64]
        fn.argtypes += [i64, i64, i64, ctypes.c_float, ctypes.c_int]
        fn.argtypes += [ptr, i64, i64, ptr, i64, i64, ptr, ptr]
        fn.restype = ctypes.c_int
        self._fn = fn

    def attend(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        cols: torch.Tensor,
        slots: torch.Tensor,
        lens: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention of ``n`` query rows over their pool slots: returns ``[n, H, d]``.

        Args:
            query: ``[H, T, d]`` bfloat16, the step's queries (any strides, ``d`` contiguous).
            keys, values: ``[S, kvh, capacity, d]`` bfloat16 pool buffers (``d`` contiguous,
                the same strides).
            cols, slots, lens: ``[n]`` int64 (contiguous, CPU): row r is query column
                ``cols[r]``, reading keys ``[0, lens[r])`` of slot ``slots[r]``.
            mask: ``[n, M]`` bool (rows contiguous, ``M >= max(lens)``) where True is a key the
                row sees, or None: every key below ``lens[r]``.
            scale: the softmax scale (``1/sqrt(d)`` for most models).
            new: ``(keys, values, positions)``: the step's keys and values ``[kvh, T, d]``
                (bfloat16, ``d`` contiguous) and ``[n]`` int64 positions; row r's key and
                value (column ``cols[r]``) are first written to position ``positions[r]`` of
                its slot, so rows see the step's keys (``keys``/``values`` must have room).
        """
        heads, _, dim = query.shape
        tensors = (query, keys, values, cols, slots, lens, mask, *(new or ()))
        if any(t is not None and t.device.type != "cpu" for t in tensors):
            msg = "the decode kernel runs on the CPU: every tensor must be in host memory"
            raise ValueError(msg)
        if not (query.dtype == keys.dtype == values.dtype == torch.bfloat16):
            msg = "the decode kernel takes bfloat16 queries, keys and values"
            raise TypeError(msg)
        if query.stride(-1) != 1 or keys.stride(-1) != 1 or keys.stride() != values.stride():
            msg = "the decode kernel needs contiguous head dims and keys/values of one layout"
            raise ValueError(msg)
        n = cols.shape[0]
        out = torch.empty(n, heads, dim, dtype=query.dtype)
        if mask is not None and mask.stride(-1) != 1:
            mask = mask.contiguous()
        new_k, new_v, pos = new if new is not None else (None, None, None)
        if new_k is not None and (
            new_k.dtype != torch.bfloat16
            or new_v.dtype != torch.bfloat16
            or new_k.stride(-1) != 1
            or new_v.stride(-1) != 1
        ):
            msg = "the decode kernel writes bfloat16 keys/values with contiguous head dims"
            raise ValueError(msg)
        code = self._fn(
            query.data_ptr(),
            query.stride(0),
            query.stride(1),
            keys.data_ptr(),
            values.data_ptr(),
            *keys.stride()[:3],
            cols.data_ptr(),
            slots.data_ptr(),
            lens.data_ptr(),
            n,
            None if mask is None else mask.data_ptr(),
            0 if mask is None else mask.stride(0),
            heads,
            keys.shape[1],
            dim,
            scale,
            torch.get_num_threads(),
            *(None, 0, 0, None, 0, 0, None)
            if new_k is None
            else (
                new_k.data_ptr(),
                *new_k.stride()[:2],
                new_v.data_ptr(),
                *new_v.stride()[:2],
                pos.data_ptr(),
            ),
            out.data_ptr(),
        )
        if code:
            msg = f"the decode kernel failed (code {code}: 1 bad head counts, 2 out of memory)"
            raise RuntimeError(msg)
        return out


def decode_kernel() -> DecodeKernel | None:
    """The decode kernel, built (or found in the cache) and loaded on first use; None where it
    cannot be had (``kernel_problem()`` says why)."""
    with _LOCK:
        if "kernel" not in _STATE:
            try:
                _STATE["kernel"], _STATE["problem"] = DecodeKernel(_build()), None
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                _STATE["kernel"], _STATE["problem"] = None, str(error)
        return _STATE["kernel"]  # type: ignore[return-value]


def kernel_problem() -> str | None:
    """Why ``decode_kernel()`` gives None (None when it gives the kernel or was not tried)."""
    decode_kernel()
    return _STATE.get("problem")  # type: ignore[return-value]


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and (found := shutil.which(name)):
            return found
    msg = "no C compiler on the PATH (install gcc, or set CC); pooled attention runs on sdpa"
    raise RuntimeError(msg)


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def _build() -> Path:
    """The shared library's path, compiled here unless the cache has it."""
    if os.environ.get(_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        msg = f"turned off ({_SWITCH}=0)"
        raise RuntimeError(msg)
    from ..loading import default_cache_dir

    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS + _LINK).encode(), version.stdout.encode()):
        key.update(part)
    key.update((_cpu_flags() + platform.machine()).encode())
    folder = default_cache_dir() / "kernels"
    target = folder / f"decode_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        obj = tmp + ".o"
        for command in (
            [cc, *_FLAGS, "-c", str(_SOURCE), "-o", obj],
            [cc, *_LINK, obj, "-o", tmp, "-lm"],
        ):
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                msg = f"building the decode kernel failed: {done.stderr.strip()[-500:]}"
                raise RuntimeError(msg)
        os.replace(tmp, target)
    finally:
        for left in (tmp, tmp + ".o"):
            if os.path.exists(left):
                os.remove(left)
    return target
