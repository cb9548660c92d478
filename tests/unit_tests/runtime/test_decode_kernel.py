"""The decode kernel (runtime/decode_kernel.py): each row equals its own attention, computed
in float32 over exactly the keys it sees; and where the kernel cannot be had, the engine's
pooled attention runs on sdpa and says why."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from langchain_parallel_reason.runtime import decode_kernel as dk

KERNEL = dk.decode_kernel()
# The kernel is built with the system's C compiler (CI's machines have gcc); without one the
# engine runs sdpa, which the engine tests cover.
needs_kernel = pytest.mark.skipif(
    KERNEL is None, reason=f"the decode kernel could not be had here: {dk.kernel_problem()}"
)


def _reference(query, keys, values, cols, slots, lens, mask, scale):
    """Row by row in float32: ``[n, H, d]``."""
    heads, kvh = query.shape[0], keys.shape[1]
    out = []
    for r in range(cols.shape[0]):
        n = int(lens[r])
        q = query[:, cols[r]].float()[:, None]  # [H, 1, d]
        k = keys[slots[r], :, :n].float().repeat_interleave(heads // kvh, 0)  # [H, n, d]
        v = values[slots[r], :, :n].float().repeat_interleave(heads // kvh, 0)
        seen = None if mask is None else mask[r, :n][None, None]
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale)[:, 0])
    return torch.stack(out)


# Head dims 64 and 128 take the AVX512-BF16 path where the CPU has it; 48 the portable one.
@needs_kernel
@pytest.mark.parametrize(("heads", "kvh", "dim"), [(9, 3, 64), (8, 2, 128), (4, 4, 48)])
def test_rows_equal_their_own_attention_over_exactly_their_keys(heads, kvh, dim) -> None:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(6, kvh, 512, dim, generator=gen).bfloat16()
    values = torch.randn(6, kvh, 512, dim, generator=gen).bfloat16()
    # The step's queries as the model makes them: a [H, T, d] view with the tokens strided.
    step = torch.randn(7, heads + kvh, dim, generator=gen).bfloat16()
    query = step[:, :heads].transpose(0, 1)
    slots = torch.tensor([4, 0, 0, 0, 2, 5, 1])
    lens = torch.tensor([1, 300, 301, 302, 77, 511, 20])
    cols = torch.tensor([6, 0, 1, 2, 5, 4, 3])
    # Peaky scores (scale 1): a key seen that should not be moves the row far.
    mask = torch.rand(7, 512, generator=gen) > 0.3
    mask[:, 0] = True
    for seen in (None, mask):
        got = KERNEL.attend(query, keys, values, cols, slots, lens, seen, 1.0)
        want = _reference(query, keys, values, cols, slots, lens, seen, 1.0)
        assert got.dtype == torch.bfloat16
        assert got.shape == (7, heads, dim)
        # float32 inside: only the output's rounding to bfloat16 (2^-8 relative) is left.
        torch.testing.assert_close(got.float(), want, atol=1e-3, rtol=2**-7)


@needs_kernel
def test_other_dtypes_are_refused_with_the_reason() -> None:
    x = torch.zeros(3, 1, 8)
    pool = torch.zeros(1, 1, 4, 8)
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(TypeError, match="bfloat16"):
        KERNEL.attend(x, pool, pool, one, one, one + 1, None, 1.0)
    # Device memory is never handed to C (a GPU's pooled rows stay on sdpa).
    away = torch.zeros(3, 1, 8, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="host memory"):
        KERNEL.attend(away, pool.bfloat16(), pool.bfloat16(), one, one, one + 1, None, 1.0)


def test_turned_off_or_without_a_compiler_it_is_none_and_says_why(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(dk, "_STATE", {})
    monkeypatch.setenv("PARALLEL_REASON_DECODE_KERNEL", "0")
    assert dk.decode_kernel() is None
    assert "PARALLEL_REASON_DECODE_KERNEL=0" in dk.kernel_problem()
    monkeypatch.setattr(dk, "_STATE", {})
    monkeypatch.delenv("PARALLEL_REASON_DECODE_KERNEL")
    monkeypatch.setenv("PARALLEL_REASON_CACHE", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert dk.decode_kernel() is None
    assert "no C compiler" in dk.kernel_problem()


@needs_kernel
def test_a_fresh_cache_builds_the_same_library(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(dk, "_STATE", {})
    monkeypatch.setenv("PARALLEL_REASON_CACHE", str(tmp_path))
    built = dk.decode_kernel()
    assert built is not None, dk.kernel_problem()
    assert built.path.parent == tmp_path / "kernels"
    assert [p.name for p in built.path.parent.iterdir()] == [built.path.name]  # no temporaries


@needs_kernel
def test_loading_it_keeps_subnormal_numbers() -> None:
    # Linked with -ffast-math, the library would turn on flush-to-zero for the whole process
    # at load (gcc's crtfastmath.o): a temperature of 5e-324 then read as 0 in sampling.
    code = (
        "import torch\n"
        "from langchain_parallel_reason.runtime.decode_kernel import decode_kernel\n"
        "assert decode_kernel() is not None\n"
        "tiny = torch.tensor([1e-40]) * 1.0\n"
        "print(float(tiny[0]) > 0, float(torch.tensor([5e-324], dtype=torch.float64)[0] * 1) > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]
