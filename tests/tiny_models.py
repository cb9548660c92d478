"""Tiny random-weight causal LMs and a small real tokenizer, built offline in about a second.

Every test builds on these: `build_tiny_tokenizer()` trains a byte-level BPE tokenizer
(ChatML template, tool support) on a built-in corpus, `build_tiny_model(arch)` makes a
seeded, eval-mode model of one of `ARCHITECTURES` whose vocabulary matches it, and
`save_tiny_model_dir()` writes both to a folder that `from_pretrained` loads. Nothing
touches the network or the Hugging Face Hub.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

__all__ = [
    "ARCHITECTURES",
    "ARCH_ATTN_PAIRS",
    "ATTN_IMPLEMENTATIONS",
    "CHAT_TEMPLATE",
    "DEFAULT_SLIDING_WINDOW",
    "EOS_TOKEN",
    "IM_START",
    "PAD_TOKEN",
    "SLIDING_ARCHITECTURES",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "save_tiny_model_dir",
]

ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
"""Every architecture `build_tiny_model` can build (all use GQA and RoPE)."""

ATTN_IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    arch: ("eager",) if arch == "gemma2" else ("eager", "sdpa") for arch in ARCHITECTURES
}
"""Stock attention implementations each architecture builds with in transformers 5.23.

Gemma2 refuses "sdpa" (its attention logits are soft-capped); a function registered with
`transformers.AttentionInterface` under a custom name still builds for every architecture.
"""

ARCH_ATTN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (arch, attn) for arch in ARCHITECTURES for attn in ATTN_IMPLEMENTATIONS[arch]
)
"""Every buildable (architecture, attention implementation) pair, for parametrizing tests."""

SLIDING_ARCHITECTURES: tuple[str, ...] = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
"""Architectures that accept a `sliding_window`; gemma2/gemma3 always have one."""

DEFAULT_SLIDING_WINDOW = 8
"""Window used by gemma2/gemma3 when none is given: small, so tests cross it."""

IM_START = "<|im_start|>"
"""ChatML turn opener (special token)."""
EOS_TOKEN = "<|im_end|>"
"""ChatML turn closer, also the tokenizer's and the models' eos token."""
PAD_TOKEN = "<|endoftext|>"
"""Padding token (special token id 0)."""
_SPECIAL_TOKENS = [PAD_TOKEN, IM_START, EOS_TOKEN]  # ids 0, 1, 2 in this order

# BPE target. Merges need a pair seen twice, so this corpus stops at 522 tokens.
_VOCAB_SIZE = 768

# Shapes shared by every architecture: GQA with 4 query heads over 2 KV heads.
_HIDDEN = 64
_HEADS = 4
_KV_HEADS = 2
_HEAD_DIM = 16
_INTERMEDIATE = 128
_MAX_POSITIONS = 2048
# Random models at the usual std (0.02) give near-uniform logits and greedy decoding then
# collapses onto one token. A wide init makes the logits peaked and prefix-dependent.
_INIT_STD = 0.4
# Gemma multiplies input embeddings by sqrt(hidden) = 8; at the wide init the embedding
# then swamps the attention output and the next token hardly depends on the prefix.
_GEMMA_EMBED_SCALE = 0.25

# A few KB of text that covers what prompts in this project contain: prose, digits and
# arithmetic, markdown, JSON, tool calls and the stage separators of the reasoning format.
_CORPUS = r"""
The quick brown fox jumps over the lazy dog. A small model reads the question, makes a plan,
and then works through each step. We think about the problem, write the answer, and check it.
Hello, world! How are you today? I am fine, thank you. What time is it? It is 10:30 in the morning.
Please explain why the sky is blue. Because air molecules scatter blue light more than red light.
The answer is 42. The total is 17 + 25 = 42. Then 6 * 7 = 42 and 84 / 2 = 42, so 100 - 58 = 42.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 25 30 50 64 99 100 128 256 512 1000 2024.
Prices rose by 3.5% in 2023; the cost was $12.99 (about 11.50 EUR). Call me at 555-0199.
Step 1: read the question. Step 2: list the facts. Step 3: compute the result. Step 4: answer.
First, second, third, fourth, fifth. Yes or no? Maybe. True, false, null, none, all, some.
She said: "Let's go to the park." He replied: 'OK, but only if it doesn't rain.'
Apples, oranges, bananas, and grapes are fruits; carrots and potatoes are vegetables.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday. January February March April May.
The user asks a question and the assistant answers. The system sets the rules for the chat.
####Plan
####A: find the speed.......
####B: find the time......
####C: multiply speed by time......
%%%%
####A:......
####%%%%
#### Step A: compute 3 + 4 = 7
#### Step B: compute 5 * 6 = 30
%%%% Conclusion: 7 + 30 = 37
......
:
::
# Heading
## Subheading
### Small heading
- item one
- item two
* bullet point
1. first item
2. second item
**bold text** and *italic text* and `inline code` and [a link](https://example.com).
> A quoted line of text.
```python
def add(a, b):
    return a + b

print(add(2, 3))
```
| name | value |
|------|-------|
| x    | 1     |
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "add", "description": "Add two numbers.",
"parameters": {"type": "object", "properties": {"a": {"type": "integer"},
"b": {"type": "integer"}}, "required": ["a", "b"]}}}
<tool_call>
{"name": "add", "arguments": {"a": 2, "b": 3}}
</tool_call>
<tool_response>
{"result": 5}
</tool_response>
<tools>
</tools>
[1, 2, 3] {"key": "value"} {} [] ( ) < > = + - * / \ | ~ ^ & % $ # @ ! ? ; , . ' " _ `
You are a helpful assistant. Think step by step and answer clearly.
If a train travels 60 miles per hour for 3 hours, it travels 180 miles.
Alice has 5 apples and gives 2 to Bob, so she has 3 apples left.
The capital of France is Paris. The capital of Japan is Tokyo. Water boils at 100 degrees.
In conclusion, the result is correct. Therefore, the final answer is 37.
"""

# ChatML in the style of Qwen2.5's template: tools as JSON lines inside the system block,
# assistant tool calls as <tool_call>{json}</tool_call>, consecutive tool results merged
# into one user turn of <tool_response> blocks.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' %}"
    "{{- messages[0].content }}"
    "{%- else %}"
    "{{- 'You are a helpful assistant.' }}"
    "{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query."
    "\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    "\\n<tools>' }}"
    "{%- for tool in tools %}"
    "{{- '\\n' }}{{- tool | tojson }}"
    "{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name"
    " and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}'
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages and messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role in ['user', 'system'] or"
    " (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' + (message.content or '') + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
"""Jinja ChatML template (system/user/assistant/tool, `tools`, `add_generation_prompt`)."""


@functools.lru_cache(maxsize=1)
def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train and return a small byte-level BPE tokenizer with a ChatML chat template.

    Training on the built-in corpus takes milliseconds and is deterministic. Byte-level
    pre-tokenization and decoding make any Unicode text round-trip exactly through
    `encode`/`decode`; digits are split one per token, as in Qwen and Llama 3. Special
    tokens: `<|endoftext|>` (id 0, pad), `<|im_start|>` (id 1), `<|im_end|>` (id 2, eos);
    there is no bos token. The result is cached and shared: do not mutate it (add tokens,
    change padding side); take `copy.deepcopy(build_tiny_tokenizer())` for a private copy.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=_MAX_POSITIONS,
    )


def _common_config(vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Config fields every architecture shares (sizes, init scale, special token ids)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": 2,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "max_position_embeddings": _MAX_POSITIONS,
        "initializer_range": _INIT_STD,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }


def _make_config(
    arch: str,
    vocab_size: int,
    tokenizer: PreTrainedTokenizerFast,
    sliding_window: int | None,
    tie_word_embeddings: bool,
) -> PretrainedConfig:
    """Build the transformers config for one architecture (see `build_tiny_model`)."""
    common = _common_config(vocab_size, tokenizer)
    common["tie_word_embeddings"] = tie_word_embeddings
    if arch == "llama":
        return LlamaConfig(**common, head_dim=_HEAD_DIM)
    if arch in ("qwen2", "qwen3"):
        config_cls = Qwen2Config if arch == "qwen2" else Qwen3Config
        extra: dict[str, Any] = {"head_dim": _HEAD_DIM} if arch == "qwen3" else {}
        if sliding_window is not None:
            # Qwen makes layers >= max_window_layers sliding: layer 0 full, layer 1 sliding,
            # so a windowed Qwen exercises the per-layer-type mask dict.
            extra |= {
                "use_sliding_window": True,
                "sliding_window": sliding_window,
                "max_window_layers": 1,
            }
        return config_cls(**common, **extra)
    if arch == "mistral":
        # Every Mistral layer slides when a window is set.
        return MistralConfig(**common, head_dim=_HEAD_DIM, sliding_window=sliding_window)
    if arch == "phi3":
        # Phi3 has no head_dim field: hidden / heads = 16. Every layer slides when windowed.
        return Phi3Config(**common, sliding_window=sliding_window)
    # Gemma mixes sliding and full layers: 4 layers give sliding, full, sliding, full.
    common["num_hidden_layers"] = 4
    layer_types = ["sliding_attention", "full_attention"] * 2
    window = DEFAULT_SLIDING_WINDOW if sliding_window is None else sliding_window
    config_cls = Gemma2Config if arch == "gemma2" else Gemma3TextConfig
    return config_cls(
        **common,
        head_dim=_HEAD_DIM,
        sliding_window=window,
        layer_types=layer_types,
        query_pre_attn_scalar=_HEAD_DIM,
    )


def build_tiny_model(
    arch: str = "llama",
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    vocab_size: int | None = None,
    sliding_window: int | None = None,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
) -> PreTrainedModel:
    """Build a seeded random-weight causal LM of `arch` in eval mode (about 10-50 ms).

    Shapes: hidden 64, 4 query heads over 2 KV heads (GQA), head_dim 16, MLP 128,
    2 layers (gemma2/gemma3: 4, alternating sliding and full attention), 2048 positions.
    The vocabulary is the tiny tokenizer's unless `vocab_size` (at least that large) is
    given; eos/pad/bos ids come from the tokenizer, in the config and generation config.
    Weights are drawn wide (std 0.4) so that greedy decoding gives varied tokens that
    depend on the whole prefix, with top-1/top-2 logit margins well above fp32 noise.

    Args:
        arch: One of `ARCHITECTURES`.
        attn_implementation: "eager", "sdpa" or a name registered with
            `transformers.AttentionInterface`. Gemma2 refuses "sdpa" (see
            `ATTN_IMPLEMENTATIONS`).
        seed: Seed for the weights; the global torch RNG state is left untouched.
        vocab_size: Embedding rows, for a model vocabulary larger than the tokenizer's.
        sliding_window: Window for qwen2/qwen3 (layer 1 slides, layer 0 is full), mistral
            and phi3 (every layer slides); None means no window. gemma2/gemma3 always
            slide on layers 0 and 2, by default over `DEFAULT_SLIDING_WINDOW` tokens.
            Llama has no window.
        dtype: Parameter dtype; weights are drawn in float32 and then cast.
        tie_word_embeddings: Share the input embedding with the LM head (as SmolLM2 and
            Gemma do). Off by default: a tied random model mostly predicts the token it
            was just given, so greedy decoding repeats one token.

    Raises:
        ValueError: On an unknown architecture, gemma2 with "sdpa", a `vocab_size`
            smaller than the tokenizer's, or a `sliding_window` for llama.
    """
    if arch not in ARCHITECTURES:
        msg = f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}"
        raise ValueError(msg)
    if arch == "gemma2" and attn_implementation == "sdpa":
        msg = (
            "transformers refuses sdpa for Gemma2 (soft-capped attention logits); "
            'use attn_implementation="eager" or iterate over ARCH_ATTN_PAIRS'
        )
        raise ValueError(msg)
    tokenizer = build_tiny_tokenizer()
    if vocab_size is None:
        vocab_size = len(tokenizer)
    elif vocab_size < len(tokenizer):
        msg = (
            f"vocab_size={vocab_size} is smaller than the tiny tokenizer's {len(tokenizer)} "
            "tokens; pass None or a larger value"
        )
        raise ValueError(msg)
    if sliding_window is not None and arch not in SLIDING_ARCHITECTURES:
        msg = f"{arch} has no sliding-window attention; use one of {SLIDING_ARCHITECTURES}"
        raise ValueError(msg)
    config = _make_config(arch, vocab_size, tokenizer, sliding_window, tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    if arch.startswith("gemma"):
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(_GEMMA_EMBED_SCALE)
    generation_config = model.generation_config
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.bos_token_id = tokenizer.bos_token_id
    return model.to(dtype).eval()


def save_tiny_model_dir(path: Path, arch: str = "llama", **kw: Any) -> Path:
    """Save a tiny model and the tiny tokenizer into `path` and return `path`.

    The folder loads with `AutoModelForCausalLM.from_pretrained(path)` and
    `AutoTokenizer.from_pretrained(path)`. `kw` goes to `build_tiny_model`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_model(arch, **kw).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def generate_alone(
    model: Any, prefix: list[int], forced: list[int], new: int, **kw: Any
) -> list[int]:
    """Exactly ``new`` greedy tokens that ``generate`` writes after ``prefix + forced`` alone
    (no EOS), with any extra ``generate`` options (e.g. ``repetition_penalty``): what a
    parallel branch must equal."""
    ids = torch.tensor([prefix + forced], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        **kw,
    )
    return out[0, ids.shape[1] :].tolist()
