"""sample_next at the edges the validators accept: tiny and huge temperatures, tiny top_p."""

from __future__ import annotations

import pytest
import torch

from langchain_parallel_reason.decoding.sampling import SamplingParams, make_generator, sample_next

# [2, 6]: row 0 has one best token (2); row 1 a tie between tokens 1 and 4, and a masked token.
LOGITS = torch.tensor(
    [
        [0.5, 1.0, 3.0, -2.0, 2.9, 0.0],
        [0.1, 2.5, -1.0, float("-inf"), 2.5, 0.3],
    ]
)


def _draws(params: SamplingParams, logits: torch.Tensor = LOGITS, n: int = 200) -> torch.Tensor:
    gen = make_generator(0)
    return torch.stack([sample_next(logits, params, gen) for _ in range(n)])  # [n, B]


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30, 1e-8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_tiny_temperature_samples_the_best_tokens(temperature: float, dtype: torch.dtype) -> None:
    draws = _draws(SamplingParams(temperature=temperature), LOGITS.to(dtype))
    assert set(draws[:, 0].tolist()) == {2}
    # A tie stays a fair draw between the tied tokens (greedy would always take the first).
    assert set(draws[:, 1].tolist()) == {1, 4}


@pytest.mark.parametrize("temperature", [3.5e38, 1e300])
def test_a_huge_temperature_is_uniform_and_never_takes_a_masked_token(temperature: float) -> None:
    draws = _draws(SamplingParams(temperature=temperature), n=600)
    assert set(draws[:, 0].tolist()) == set(range(6))
    assert set(draws[:, 1].tolist()) == {0, 1, 2, 4, 5}


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-45])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p: float) -> None:
    draws = _draws(SamplingParams(temperature=1.0, top_p=top_p))
    assert set(draws[:, 0].tolist()) == {2}
    assert set(draws[:, 1].tolist()) <= {1, 4}


def test_ordinary_settings_still_sample_the_distribution() -> None:
    # Sanity check that the float64 path did not turn sampling into argmax.
    draws = _draws(SamplingParams(temperature=1.0, top_k=3), n=400)
    assert set(draws[:, 0].tolist()) == {1, 2, 4}
    counts = torch.bincount(draws[:, 0], minlength=6)
    assert counts[2] > counts[1]


def test_overflowed_logits_share_the_draw_instead_of_raising() -> None:
    # A half-precision model can overflow to +inf: inf - inf was NaN and multinomial raised.
    logits = torch.tensor([[0.0, float("inf"), 3.0, float("inf"), float("-inf")]])
    generator = make_generator(0)
    drawn = {
        int(sample_next(logits, SamplingParams(temperature=0.7), generator)) for _ in range(64)
    }
    assert drawn == {1, 3}


def test_one_pass_over_rows_with_their_own_settings_equals_each_row_alone() -> None:
    # Whole-batch sampling (the engine's one pass per forward): every row, with its own
    # settings and generator, gets the token it gets alone, whatever rows share its pass.
    from langchain_parallel_reason.decoding.sampling import sample_rows

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.7, top_p=0.6),
        SamplingParams(),
        SamplingParams(temperature=1.0, top_k=3, top_p=0.9),
    ]
    for step in range(20):
        alone = [
            int(sample_next(logits[i : i + 1], p, make_generator(100 * step + i))[0])
            for i, p in enumerate(params)
        ]
        gens = [make_generator(100 * step + i) for i in range(len(params))]
        together = sample_rows(logits, params, gens).tolist()
        assert together == alone
        logits = logits.roll(step + 1, dims=-1)


def test_whole_batch_greedy_is_one_float32_argmax_of_half_logits() -> None:
    from langchain_parallel_reason.decoding.sampling import sample_rows

    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert sample_rows(logits, SamplingParams()).tolist() == logits.float().argmax(-1).tolist()
