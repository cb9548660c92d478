"""The runtime: engines that own a model (or a server connection) and serve requests.

No LangChain here. ``base`` states the contract every engine serves; ``threads`` the CPU
threading policy; ``remote`` runs the stages on an OpenAI-compatible server (vLLM, SGLang).
"""
