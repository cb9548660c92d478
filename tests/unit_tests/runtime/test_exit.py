"""The engine at interpreter exit: calls from threads that outlive ``main`` complete; a request
nobody reads any more is cancelled, without tracebacks or an abort.

Each case runs a small script in a fresh interpreter on a saved tiny model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(script: str, model_dir: Path) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(script)
    return subprocess.run(
        [sys.executable, "-c", code, str(model_dir)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_calls_from_a_thread_that_outlives_main_complete(tiny_model_dir: Path) -> None:
    # Regression: interpreter shutdown stopped the engine's worker pool (and transformers'
    # loading pool), so all 3 calls failed ("the engine's scheduler thread died").
    done = _run(
        """
        import sys, threading
        from langchain_parallel_reason import ChatParallelReason
        m = ChatParallelReason(model=sys.argv[1], max_tokens=12, mode="sequential")
        out = []
        def work():
            for _ in range(3):
                out.append(m.invoke("hi").content)
            print("finished", len(out), flush=True)
        threading.Thread(target=work).start()
        """,
        tiny_model_dir,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished 3" in done.stdout, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_an_abandoned_stream_is_cancelled_at_exit(tiny_model_dir: Path) -> None:
    # Regression: exit waited for the abandoned request to run to max_tokens and printed
    # tracebacks from the engine's thread.
    done = _run(
        """
        import sys
        from langchain_parallel_reason import ChatParallelReason
        m = ChatParallelReason(model=sys.argv[1], max_tokens=4000)
        s = m.stream("Compare tea and coffee.", steps=["Tea", "Coffee"])
        next(s); next(s)
        print("left", flush=True)
        """,
        tiny_model_dir,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "left" in done.stdout
    assert "Traceback" not in done.stderr
    assert "terminate called" not in done.stderr
