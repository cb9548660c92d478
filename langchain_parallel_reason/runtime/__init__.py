"""The runtime: engines that own a model (or a server connection) and serve requests.

No LangChain here. ``door.open_engine`` is the one way in (loading, the registry of engines);
``base`` states the contract every engine serves; ``engine`` is the in-process engine (one
scheduler thread, each request's pipeline a coroutine on it); ``remote`` and ``http`` run the
same pipeline on an OpenAI-compatible server (vLLM, SGLang); ``threads`` the CPU threading
policy. Importing this package loads neither torch nor transformers.
"""

from .base import EngineLimits, Request
from .door import DEFAULT_MODEL_NAME, open_engine

__all__ = ["DEFAULT_MODEL_NAME", "EngineLimits", "Request", "open_engine"]
