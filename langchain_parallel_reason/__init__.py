"""langchain-parallel-reason: parallel reasoning steps in one sequence, as a LangChain chat model.

`ChatParallelReason` is imported on first access, so that importing the package (the CLI's
`--help`, for one) does not pay for langchain-core, torch and transformers. Importing the
package sets the CPU threading policy (``runtime.threads``): idle OpenMP threads sleep instead of
spinning, unless ``OMP_WAIT_POLICY`` is set already.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langchain_parallel_reason.runtime.threads import calm_openmp

# Before torch loads (it is imported lazily below), so libgomp picks the policy up.
calm_openmp()

if TYPE_CHECKING:
    from langchain_parallel_reason.chat_models import ChatParallelReason

__version__ = "0.1.0"
__all__ = ["ChatParallelReason", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "ChatParallelReason":
        from langchain_parallel_reason.chat_models import ChatParallelReason

        return ChatParallelReason
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
