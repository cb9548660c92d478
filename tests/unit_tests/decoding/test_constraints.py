"""GrammarConstraint with a real (tiny byte-level BPE) tokenizer and random logits."""

from __future__ import annotations

import copy
import gc
import json
import re
import threading

import pytest
import torch
import xgrammar as xgr
from tiny_models import build_tiny_tokenizer

from langchain_parallel_reason.decoding import constraints
from langchain_parallel_reason.decoding.constraints import GrammarConstraint, clear_grammar_cache
from langchain_parallel_reason.plan import PlanFormatError, parse_plan, plan_grammar_ebnf

# A JSON schema whose numbers and arrays are bounded, so that decoding random logits under it
# ends quickly. The bounded string uses a pattern: xgrammar 0.2.8 compiles a `maxLength`
# string to a rule that lets raw control characters through (invalid JSON for json.loads).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{0,10}$"},
        "note": {"type": "string"},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
    },
    "required": ["name", "note", "count", "ok", "tags"],
}


@pytest.fixture(scope="module")
def tok():
    """The shared tiny tokenizer."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def padded_vocab(tok) -> int:
    """A model logits width larger than the tokenizer, as with padded lm heads."""
    return len(tok) + 30


def _greedy(
    constraint: GrammarConstraint, width: int, seed: int, limit: int = 2000
) -> tuple[list[int], bool]:
    """Decode argmax of random logits under `constraint`; return (ids, stopped_by_stop_token)."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    while not constraint.is_terminated():
        assert len(ids) < limit, "constrained decoding did not terminate"
        logits = torch.randn(1, width, generator=gen)
        token = int(constraint.mask_logits(logits).argmax())
        constraint.advance(token)
        ids.append(token)
    stopped = bool(ids) and ids[-1] in constraint.stop_token_ids
    return (ids[:-1] if stopped else ids), stopped


@pytest.mark.parametrize("seed", range(12))
def test_plan_grammar_always_yields_a_parsable_plan(tok, padded_vocab: int, seed: int) -> None:
    max_branches = 2 + seed % 5
    # Odd seeds: small limits (plain repetitions); even seeds: the defaults (chunked preamble).
    title_chars, preamble_chars = (20, 40) if seed % 2 else (60, 160)
    ebnf = plan_grammar_ebnf(max_branches, title_chars, preamble_chars)
    constraint = GrammarConstraint.from_ebnf(tok, ebnf, vocab_size=padded_vocab)
    ids, stopped = _greedy(constraint, padded_vocab, seed)
    # The grammar ends at ####%%%%, where only eos could follow: no forward pass spent on it.
    assert not stopped
    assert constraint.is_completed()
    assert all(i < len(tok) for i in ids)  # padding columns are never chosen
    text = tok.decode(ids)
    assert text.endswith("\n####%%%%")
    assert "<|" not in text  # special tokens are never written as text
    # Random titles may repeat; no grammar can forbid that, so it is the only allowed miss.
    reason = None
    try:
        plan = parse_plan(text, max_branches=max_branches, max_title_chars=title_chars)
    except PlanFormatError as exc:
        reason = str(exc)
    if reason is not None:
        assert reason.startswith("duplicate titles"), (reason, text)
    else:
        assert 2 <= len(plan.titles) <= max_branches
        assert all(len(title) <= title_chars for title in plan.titles)


@pytest.mark.parametrize("seed", range(8))
def test_the_rest_of_a_plan_continues_any_cut_plan(tok, padded_vocab: int, seed: int) -> None:
    # A plan cut at a title start after k step lines, continued under the rest's grammar,
    # is a whole plan the first grammar accepts: the same shape, 2..max_branches steps.
    max_branches = 2 + seed % 4
    ebnf = plan_grammar_ebnf(max_branches, 20, 40)
    whole = GrammarConstraint.from_ebnf(tok, ebnf, vocab_size=padded_vocab)
    ids, _ = _greedy(whole, padded_vocab, seed)
    text = tok.decode(ids)
    head, *lines = text.split("####")[:-1]  # preamble, then each step line's text
    k = seed % len(lines)
    rest = GrammarConstraint.from_ebnf(
        tok, plan_grammar_ebnf(max_branches, 20, done_steps=k), vocab_size=padded_vocab
    )
    more, _ = _greedy(rest, padded_vocab, seed + 100)
    cut = head + "".join("####" + line for line in lines[:k]) + "####"
    full = GrammarConstraint.from_ebnf(tok, ebnf, vocab_size=padded_vocab)
    for token in tok.encode(cut + tok.decode(more), add_special_tokens=False):
        full.advance(token)  # raises on a token the whole plan's grammar would not allow
    assert full.is_completed()
    with pytest.raises(ValueError, match="done_steps"):
        plan_grammar_ebnf(max_branches, done_steps=max_branches)
    with pytest.raises(ValueError, match="done_steps"):
        plan_grammar_ebnf(max_branches, titles=["Tea", "Coffee"], done_steps=0)


@pytest.mark.parametrize("seed", range(8))
def test_json_schema_yields_valid_json(tok, padded_vocab: int, seed: int) -> None:
    constraint = GrammarConstraint.from_json_schema(tok, SCHEMA, vocab_size=padded_vocab)
    ids, _ = _greedy(constraint, padded_vocab, seed)
    value = json.loads(tok.decode(ids))
    assert list(value) == ["name", "note", "count", "ok", "tags"]  # the schema's order
    assert re.fullmatch("[A-Za-z ]{0,10}", value["name"])
    assert isinstance(value["note"], str)
    assert isinstance(value["count"], int)
    assert 0 <= value["count"] <= 999
    assert isinstance(value["ok"], bool)
    assert set(value["tags"]) <= {"x", "y"}
    assert len(value["tags"]) <= 3


def test_json_completion_allows_only_the_stop_token(tok) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    constraint = GrammarConstraint.from_json_schema(tok, json.dumps(schema))
    for token in tok.encode('{"a": 7}'):
        constraint.advance(token)
    assert constraint.is_completed()
    assert constraint.allowed_token_ids() == [tok.eos_token_id]
    assert constraint.is_terminated()
    constraint.advance(tok.eos_token_id)  # accepting the stop token is allowed too
    assert constraint.is_terminated()


def test_stop_token_can_end_a_grammar_that_could_go_on(tok) -> None:
    constraint = GrammarConstraint.from_ebnf(tok, 'root ::= "a"+', stop_token_ids=[0])
    constraint.advance(tok.convert_tokens_to_ids("a"))
    assert constraint.is_completed()
    assert not constraint.is_terminated()  # more "a" may follow
    assert set(constraint.allowed_token_ids()) >= {0, tok.convert_tokens_to_ids("a")}
    with pytest.raises(ValueError, match="not allowed"):
        constraint.advance(tok.eos_token_id)  # eos is not a stop token here
    constraint.advance(0)
    assert constraint.is_terminated()
    assert constraint.forced_text() == ""


def test_advance_rejects_a_disallowed_token(tok) -> None:
    constraint = GrammarConstraint.from_ebnf(tok, plan_grammar_ebnf(3))
    allowed = set(constraint.allowed_token_ids())
    hash_id = tok.convert_tokens_to_ids("#")
    assert hash_id not in allowed  # the preamble cannot start with '#'
    with pytest.raises(ValueError, match=r"token \d+ \('#'\) is not allowed"):
        constraint.advance(hash_id)
    with pytest.raises(ValueError, match="out of range"):
        constraint.advance(len(tok) + 10_000)
    # A rejected token leaves the state unchanged.
    assert set(constraint.allowed_token_ids()) == allowed
    for special in (0, 1, tok.eos_token_id):
        assert special not in allowed


def test_forced_text_after_a_title(tok) -> None:
    constraint = GrammarConstraint.from_ebnf(tok, plan_grammar_ebnf(3))
    for token in tok.encode("Intro\n####Taste:"):
        constraint.advance(token)
    assert constraint.forced_text() == "......\n####"


def test_mask_logits_shapes_dtypes_and_padding(tok, padded_vocab: int) -> None:
    constraint = GrammarConstraint.from_ebnf(tok, plan_grammar_ebnf(3), vocab_size=padded_vocab)
    allowed = constraint.allowed_token_ids()
    assert constraint.vocab_size == padded_vocab
    for logits in (
        torch.zeros(padded_vocab),
        torch.zeros(1, padded_vocab, dtype=torch.bfloat16),
    ):
        masked = constraint.mask_logits(logits)
        assert masked.shape == logits.shape
        assert masked.dtype == logits.dtype
        finite = torch.isfinite(masked).flatten().nonzero().flatten().tolist()
        assert finite == allowed
        assert torch.equal(logits, torch.zeros_like(logits))  # the input is not modified
    # A wider head than the constraint knows: the extra columns are masked as well.
    wider = constraint.mask_logits(torch.zeros(padded_vocab + 5))
    assert torch.isinf(wider[padded_vocab:]).all()
    with pytest.raises(ValueError, match="vocab_size"):
        constraint.mask_logits(torch.zeros(padded_vocab - 1))
    with pytest.raises(ValueError, match="shape"):
        constraint.mask_logits(torch.zeros(2, padded_vocab))


@pytest.mark.gpu
def test_mask_logits_on_cuda(tok) -> None:
    constraint = GrammarConstraint.from_ebnf(tok, plan_grammar_ebnf(3))
    logits = torch.randn(1, constraint.vocab_size, device="cuda", dtype=torch.float16)
    masked = constraint.mask_logits(logits)
    assert masked.device == logits.device
    finite = torch.isfinite(masked).flatten().nonzero().flatten().tolist()
    assert finite == constraint.allowed_token_ids()


def test_mask_after_termination_is_an_error(tok) -> None:
    constraint = GrammarConstraint.from_ebnf(tok, 'root ::= "a"')
    constraint.advance(tok.convert_tokens_to_ids("a"))
    constraint.advance(tok.eos_token_id)
    with pytest.raises(RuntimeError, match="terminated"):
        constraint.mask_logits(torch.zeros(constraint.vocab_size))
    with pytest.raises(ValueError, match="not allowed"):
        constraint.advance(tok.convert_tokens_to_ids("a"))
    constraint.reset()
    assert not constraint.is_terminated()
    assert constraint.allowed_token_ids() == [tok.convert_tokens_to_ids("a")]


def test_invalid_inputs(tok) -> None:
    with pytest.raises(ValueError, match="invalid EBNF"):
        GrammarConstraint.from_ebnf(tok, "root ::= ")
    with pytest.raises(ValueError, match="not valid JSON"):
        GrammarConstraint.from_json_schema(tok, "{not json")
    with pytest.raises(ValueError, match="vocab_size"):
        GrammarConstraint.from_ebnf(tok, 'root ::= "a"', vocab_size=0)
    with pytest.raises(ValueError, match="Hugging Face tokenizer"):
        GrammarConstraint.from_ebnf(object(), 'root ::= "a"')


def test_compiled_grammar_is_cached_and_matchers_are_not(tok) -> None:
    clear_grammar_cache()
    ebnf = plan_grammar_ebnf(4)
    first = GrammarConstraint.from_ebnf(tok, ebnf)
    second = GrammarConstraint.from_ebnf(tok, ebnf)
    assert first._matcher is not second._matcher
    compiler = constraints._compiler_for(tok, None)
    assert compiler is constraints._compiler_for(tok, None)
    assert compiler is not constraints._compiler_for(tok, len(tok) + 30)  # per vocab size
    # Separate state: advancing one constraint leaves the other at the start.
    newline = tok.encode("\n")[0]
    first.advance(tok.encode("I")[0])
    assert newline in first.allowed_token_ids()  # the preamble may end now...
    assert newline not in second.allowed_token_ids()  # ...but not before its first character
    first.reset()
    assert first.allowed_token_ids() == second.allowed_token_ids()


def test_one_compilation_per_grammar_across_threads(tok, monkeypatch) -> None:
    clear_grammar_cache()
    calls: list[str] = []
    real = xgr.GrammarCompiler.compile_grammar

    def counting(self, grammar, **kwargs):
        calls.append(grammar)
        return real(self, grammar, **kwargs)

    monkeypatch.setattr(xgr.GrammarCompiler, "compile_grammar", counting)
    ebnf = plan_grammar_ebnf(6, max_title_chars=33)
    barrier = threading.Barrier(6)
    results: list[GrammarConstraint] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            barrier.wait()
            results.append(GrammarConstraint.from_ebnf(tok, ebnf))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 6
    assert calls == [ebnf]


def test_failed_compilation_is_retried(tok) -> None:
    clear_grammar_cache()
    for _ in range(2):  # the failure is not cached as a result
        with pytest.raises(ValueError, match="invalid EBNF"):
            GrammarConstraint.from_ebnf(tok, "root ::= missing_rule")


def test_cache_entries_die_with_the_tokenizer() -> None:
    clear_grammar_cache()
    private = copy.deepcopy(build_tiny_tokenizer())
    GrammarConstraint.from_ebnf(private, 'root ::= "a"')
    ident = id(private)
    assert ident in constraints._ALIVE
    del private
    gc.collect()
    GrammarConstraint.from_ebnf(build_tiny_tokenizer(), 'root ::= "a"')  # triggers cleanup
    reused = ident in constraints._ALIVE  # CPython may hand the id to a new object
    assert reused or all(key[0] != ident for key in constraints._COMPILERS._items)


def _accepts(constraint: GrammarConstraint, tok, text: str) -> bool:
    """Whether the grammar accepts exactly `text` (fed token by token) as a complete match."""
    constraint.reset()
    try:
        for token in tok.encode(text):
            constraint.advance(token)
    except ValueError:
        return False
    return constraint.is_completed()


@pytest.mark.parametrize(
    ("title_chars", "preamble_chars"),
    [(1, 1), (2, 2), (3, 40), (64, 41), (65, 80), (66, 81), (100, 160), (121, 400)],
)
def test_plan_grammar_length_limits_are_exact(tok, title_chars: int, preamble_chars: int) -> None:
    ebnf = plan_grammar_ebnf(3, max_title_chars=title_chars, max_preamble_chars=preamble_chars)
    constraint = GrammarConstraint.from_ebnf(tok, ebnf)

    def plan(title: str, preamble: str = "P") -> str:
        return f"{preamble}\n####{title}:......\n####B:......\n####%%%%"

    for length in {1, 2, title_chars - 1, title_chars, title_chars + 1} - {0}:
        assert _accepts(constraint, tok, plan("é" * length)) == (length <= title_chars), length
    for length in {1, preamble_chars, preamble_chars + 1}:
        assert _accepts(constraint, tok, plan("B", "p" * length)) == (length <= preamble_chars)
    # Structure: 2..max_branches steps, no '#' or ':' in titles, no space at a title's ends.
    assert _accepts(constraint, tok, plan("A"))
    assert not _accepts(constraint, tok, "P\n####A:......\n####%%%%")
    assert not _accepts(constraint, tok, "P\n" + "####A:......\n" * 4 + "####%%%%")
    assert not _accepts(constraint, tok, plan("A#B"))
    assert not _accepts(constraint, tok, plan("%A"))
    assert not _accepts(constraint, tok, plan(" A"))
    assert not _accepts(constraint, tok, plan("\u3000A"))
    if title_chars >= 3:
        assert _accepts(constraint, tok, plan("A B"))
        assert _accepts(constraint, tok, plan("A%"))
        assert not _accepts(constraint, tok, plan("A:B"))
        assert not _accepts(constraint, tok, plan("A\u00a0"))


@pytest.mark.parametrize("seed", range(6))
def test_a_preamble_state_is_a_function_of_its_length(tok, padded_vocab: int, seed: int) -> None:
    """The premise of naming the plan's preamble states: two different preambles of the same
    length leave the plan grammar in states with the same mask, near the length bounds too
    (where xgrammar's masks are slow), and `accepted_text` is the text the grammar matched."""
    ebnf = plan_grammar_ebnf(4, max_preamble_chars=60)
    rng = torch.Generator().manual_seed(seed)
    alphabet = "abcdefghij klmnop,.;!?()"

    def walk(text: str) -> GrammarConstraint:
        g = GrammarConstraint.from_ebnf(tok, ebnf, vocab_size=padded_vocab)
        for t in tok.encode(text, add_special_tokens=False):
            g.advance(t)
        assert g.accepted_text() == text
        return g

    for length in (1, 20, 38, 39, 40, 41, 55, 59, 60):
        texts = [
            "".join(
                alphabet[int(i)] for i in torch.randint(len(alphabet), (length,), generator=rng)
            )
            for _ in range(2)
        ]
        a, b = (walk(t) for t in texts)
        assert torch.equal(a._allowed_mask(), b._allowed_mask()), (length, texts)


def test_a_named_state_computes_its_mask_once_and_still_checks_tokens(tok, monkeypatch) -> None:
    ebnf = plan_grammar_ebnf(3, max_preamble_chars=50)
    first = GrammarConstraint.from_ebnf(tok, ebnf)
    for t in tok.encode("One two", add_special_tokens=False):
        first.advance(t)
    first.name_state(("plan preamble", 7))
    shared = first._allowed_mask()

    second = GrammarConstraint.from_ebnf(tok, ebnf)
    for t in tok.encode("Six ten", add_special_tokens=False):
        second.advance(t)
    second.name_state(("plan preamble", 7))
    fills = []
    monkeypatch.setattr(second._matcher, "fill_next_token_bitmask", fills.append, raising=False)
    assert second._allowed_mask() is shared  # taken, not recomputed
    assert not fills
    # A wrong name cannot let a forbidden token in: the grammar itself accepts each token.
    third = GrammarConstraint.from_ebnf(tok, ebnf)
    third.name_state(("plan preamble", 7))  # really at length 0: no newline yet
    newline = tok.encode("\n", add_special_tokens=False)[0]
    assert third._allowed_mask()[newline]  # the shared mask (length 7) lets it through
    with pytest.raises(ValueError, match="not allowed"):
        third.advance(newline)
