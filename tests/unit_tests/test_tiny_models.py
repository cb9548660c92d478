"""The test fixtures themselves: the tiny tokenizer round-trips and renders chats, and every
tiny architecture builds, runs and decodes greedily to varied, prefix-dependent tokens."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import (
    ARCH_ATTN_PAIRS,
    ARCHITECTURES,
    ATTN_IMPLEMENTATIONS,
    DEFAULT_SLIDING_WINDOW,
    EOS_TOKEN,
    IM_START,
    PAD_TOKEN,
    SLIDING_ARCHITECTURES,
    build_tiny_model,
    build_tiny_tokenizer,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

ROUND_TRIP_TEXTS = [
    "",
    "Hello, world!",
    "####A:......\n####%%%%",
    "  leading spaces, trailing tabs\t\t\n\n\r\n",
    "héllo wörld — naïve café, 你好世界, こんにちは, 안녕하세요",
    "emoji 🤖👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "RTL: مرحبا بالعالم and שלום עולם",
    "math ∑ x² ≤ ∞, control \x00\x07\x1b, BOM \ufeff, zero-width\u200b!",
    '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>',
]

PROMPTS = [
    "Hello, world! The answer is",
    "17 + 25 = 42, so the answer is",
    "####A:...... the answer is",
    "Paris is the capital of France; the answer is",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
        ],
    },
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "2 + 3 = 5."},
]


def _greedy(model, ids: torch.Tensor, n: int = 8) -> list[int]:
    """Greedy continuation of one prompt `ids: [1, T]`, as a list of `n` new token ids."""
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[0, ids.shape[1] :].tolist()


# --- tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips_any_text(tiny_tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    assert 512 <= len(tok) <= 1024
    assert tok.eos_token == EOS_TOKEN
    assert tok.pad_token == PAD_TOKEN
    assert tok.bos_token is None
    assert tok.convert_tokens_to_ids([PAD_TOKEN, IM_START, EOS_TOKEN]) == [0, 1, 2]
    # Special tokens stay atomic inside text and drop out with skip_special_tokens.
    ids = tok.encode(f"{IM_START}user\nhi{EOS_TOKEN}")
    assert ids[0] == 1
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("piece", ["####", "%%%%", "......"])
def test_reasoning_separators_are_single_tokens(tiny_tokenizer, piece: str) -> None:
    assert len(tiny_tokenizer.encode(piece)) == 1


def test_tokenizer_training_is_deterministic(tiny_tokenizer) -> None:
    fresh = build_tiny_tokenizer.__wrapped__()
    assert fresh.get_vocab() == tiny_tokenizer.get_vocab()
    assert fresh.encode(ROUND_TRIP_TEXTS[4]) == tiny_tokenizer.encode(ROUND_TRIP_TEXTS[4])


def test_chat_template_renders_every_role_and_tools(tiny_tokenizer) -> None:
    text = tiny_tokenizer.apply_chat_template(
        [*CHAT, {"role": "user", "content": "Thanks!"}],
        tools=TOOLS,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(TOOLS[0]) in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}'
        "\n</tool_call><|im_end|>\n"
    ) in text
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n" in text
    assert "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n" in text
    assert text.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == text.count("<|im_end|>") + 1


def test_chat_template_without_tools_or_generation_prompt(tiny_tokenizer) -> None:
    text = tiny_tokenizer.apply_chat_template(CHAT[:2], tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    )
    no_system = tiny_tokenizer.apply_chat_template(
        CHAT[1:2], tokenize=False, add_generation_prompt=True
    )
    assert no_system == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_tools_without_system_and_string_arguments(tiny_tokenizer) -> None:
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        return a + b

    chat = [
        CHAT[1],
        {
            "role": "assistant",
            "content": "Let me add.",
            "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
            ],
        },
        {"role": "tool", "content": "5"},
        {"role": "tool", "content": "5 again"},
    ]
    text = tiny_tokenizer.apply_chat_template(chat, tools=[add], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools")
    assert '"name": "add"' in text
    assert "The first integer." in text
    assert 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}' in text
    # Consecutive tool results share one user turn.
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\n5\n</tool_response>"
        "\n<tool_response>\n5 again\n</tool_response><|im_end|>\n"
    )


def test_chat_template_tokenized_matches_text(tiny_tokenizer) -> None:
    text = tiny_tokenizer.apply_chat_template(CHAT, tools=TOOLS, tokenize=False)
    ids = tiny_tokenizer.apply_chat_template(CHAT, tools=TOOLS, tokenize=True, return_dict=False)
    assert ids == tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text


# --- models ------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "attn"), ARCH_ATTN_PAIRS)
def test_every_architecture_builds_runs_and_decodes(tiny_model, tiny_tokenizer, arch, attn):
    model = tiny_model(arch, attn_implementation=attn)
    assert not model.training
    assert model.config._attn_implementation == attn
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert model.config.eos_token_id == tiny_tokenizer.eos_token_id
    assert model.config.pad_token_id == tiny_tokenizer.pad_token_id
    assert next(model.parameters()).dtype == torch.float32

    ids = tiny_tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tiny_tokenizer))
    assert torch.isfinite(logits).all()

    continuations = []
    for prompt in PROMPTS:
        ids = tiny_tokenizer(prompt, return_tensors="pt").input_ids
        first = _greedy(model, ids)
        assert _greedy(model, ids) == first  # deterministic
        continuations.append(first)
    assert max(len(set(c)) for c in continuations) > 1, "greedy decoding repeats one token"
    assert len({tuple(c) for c in continuations}) > 1, "continuations ignore the prompt"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_continuation_depends_on_the_whole_prefix(tiny_model, tiny_tokenizer, arch):
    # Same last tokens, different context: attention, not just the last token, decides.
    model = tiny_model(arch, attn_implementation="eager")
    firsts = {
        _greedy(model, tiny_tokenizer(p, return_tensors="pt").input_ids, n=1)[0] for p in PROMPTS
    }
    assert len(firsts) >= 2


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if "sdpa" in ATTN_IMPLEMENTATIONS[a]])
def test_eager_and_sdpa_agree(tiny_model, tiny_tokenizer, arch):
    # 24 tokens: longer than the gemma window, so the sliding path is compared too.
    ids = tiny_tokenizer(PROMPTS[3] + " " + PROMPTS[1], return_tensors="pt").input_ids
    assert ids.shape[1] > DEFAULT_SLIDING_WINDOW
    with torch.no_grad():
        eager = tiny_model(arch, attn_implementation="eager")(ids).logits
        sdpa = tiny_model(arch, attn_implementation="sdpa")(ids).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-4, rtol=1e-4)


def test_gemma2_refuses_sdpa_with_a_fix():
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        build_tiny_model("gemma2", attn_implementation="sdpa")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_mixes_sliding_and_full_layers(tiny_model, arch):
    config = tiny_model(arch, attn_implementation="eager").config
    assert config.sliding_window == DEFAULT_SLIDING_WINDOW
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}


@pytest.mark.parametrize("arch", [a for a in SLIDING_ARCHITECTURES if not a.startswith("gemma")])
def test_optional_sliding_window_changes_long_inputs_only(tiny_model, arch):
    windowed = tiny_model(arch, attn_implementation="eager", sliding_window=4)
    plain = tiny_model(arch, attn_implementation="eager")
    assert windowed.config.sliding_window == 4
    assert plain.config.sliding_window is None
    ids = torch.arange(3, 19).unsqueeze(0)  # [1, 16]
    with torch.no_grad():
        a, b = windowed(ids).logits, plain(ids).logits
    torch.testing.assert_close(a[:, :3], b[:, :3])  # within the window: same weights, same
    assert not torch.allclose(a[:, -1], b[:, -1], atol=1e-3)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_tiny_model("gpt2")
    with pytest.raises(ValueError, match="no sliding-window"):
        build_tiny_model("llama", sliding_window=4)
    with pytest.raises(ValueError, match="smaller than"):
        build_tiny_model("llama", vocab_size=10)


def test_seed_dtype_vocab_and_tying(tiny_tokenizer):
    state = torch.random.get_rng_state()
    a, b = build_tiny_model("qwen3", seed=1), build_tiny_model("qwen3", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = build_tiny_model("qwen3", seed=2)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)

    bf16 = build_tiny_model("qwen3", seed=1, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(bf16.lm_head.weight.float(), a.lm_head.weight, atol=2e-2, rtol=0)

    wide = build_tiny_model("llama", vocab_size=640)
    assert wide.get_output_embeddings().weight.shape[0] == 640

    tied = build_tiny_model("llama", tie_word_embeddings=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight


def test_model_cache_and_session_fixtures(tiny_model, tiny_llama):
    assert tiny_model("llama") is tiny_model("llama", attn_implementation="sdpa")
    assert tiny_model("llama", seed=1) is not tiny_model("llama")
    assert isinstance(tiny_llama, type(tiny_model("llama")))
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_saved_dir_loads_with_auto_classes(tiny_model_dir, tiny_llama, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tiny_tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama(ids).logits)
    assert model.generation_config.eos_token_id == tiny_tokenizer.eos_token_id
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.encode(text) == tiny_tokenizer.encode(text)
    assert tokenizer.apply_chat_template(
        CHAT, tools=TOOLS, tokenize=False
    ) == tiny_tokenizer.apply_chat_template(CHAT, tools=TOOLS, tokenize=False)


@pytest.mark.gpu
def test_gpu_marker_runs_only_with_cuda():
    assert torch.cuda.is_available()
