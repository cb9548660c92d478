"""langchain-parallel-reason: parallel reasoning steps in one sequence, as a LangChain chat model."""

__version__ = "0.1.0"
__all__ = ["__version__"]
