"""The decoding package is the engine: it must not depend on LangChain (or on the adapter)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import langchain_parallel_reason.decoding as decoding

DECODING_DIR = Path(decoding.__file__).parent


def test_no_langchain_import_in_runtime_sources() -> None:
    """runtime/ serves requests for the adapter; it may use the package, never LangChain."""
    for path in sorted((DECODING_DIR.parent / "runtime").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith("langchain_core"), f"{path.name} imports {name}"
                assert name != "chat_models", f"{path.name} imports the adapter"


def test_no_langchain_import_in_decoding_sources() -> None:
    for path in sorted(DECODING_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.ImportFrom) and node.level > 1:
                names = ["..(parent package)"]
            for name in names:
                assert not name.startswith(("langchain", "..")), f"{path.name} imports {name}"


def test_importing_decoding_loads_no_langchain() -> None:
    code = (
        "import sys, langchain_parallel_reason.decoding, langchain_parallel_reason.decoding.constraints;"
        "print(sorted(m for m in sys.modules if m.startswith('langchain_core')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
