"""langchain-parallel-reason: parallel reasoning steps in one sequence, as a LangChain chat model.

`ChatParallelReason` is imported on first access, so that importing the package (the CLI's
`--help`, for one) does not pay for langchain-core, torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
