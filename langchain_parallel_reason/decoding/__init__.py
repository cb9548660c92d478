"""Belt-mask parallel decoding for stock transformers causal LMs (no LangChain here).

Modules: ``masks`` (belt masks, positions, the mask backend), ``cache`` (split-attention cache),
``attention`` (the backend contract; shared-prefix + per-branch attention, the split backend),
``sampling`` (``SamplingParams``, ``SuppressFirst``, next-token choice), ``stops`` (stop strings,
end rules), ``sequential`` (ordinary decoding with constraints), ``decoder`` (the Stage-2 loop),
``merge`` (Stage 3 over the branches' own KV, laid out in a row), ``packing`` (bfloat16 Linear
weights packed once for a CPU's oneDNN, sibling projections fused), ``lean`` (a stock Llama's
forward as a plain loop over its own modules).
"""

from .decoder import (
    SPLIT_ARCHITECTURES,
    BranchesOutput,
    BranchResult,
    StepEvent,
    choose_attention,
    decode_branches,
    iter_decode_branches,
    model_device,
    prefill,
)
from .sampling import SamplingParams, SuppressFirst, make_generator, sample_next

__all__ = [
    "SPLIT_ARCHITECTURES",
    "BranchResult",
    "BranchesOutput",
    "SamplingParams",
    "StepEvent",
    "SuppressFirst",
    "choose_attention",
    "decode_branches",
    "iter_decode_branches",
    "make_generator",
    "model_device",
    "prefill",
    "sample_next",
]
