"""Grammar-constrained decoding over xgrammar, for our own decode loop.

Contract: a `GrammarConstraint` masks one row of logits ``[V]`` / ``[1, V]`` to the tokens its
grammar allows next and advances one accepted token at a time. Compiled grammars are cached per
(tokenizer, vocab size, grammar) and shared across threads; each constraint owns its matcher.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any

import torch
import xgrammar as xgr

__all__ = ["GrammarConstraint", "clear_grammar_cache"]

_GRAMMARS_PER_TOKENIZER = 64  # compiled grammars kept per tokenizer (LRU)


# Per compiled grammar: the masks of named states (`GrammarConstraint.name_state`), at most
# _NAMED_LIMIT each ([V] bool tensors, 49 kB apiece for a 49k vocabulary).
# Keyed by id() (compiled grammars are not hashable); an entry goes when its grammar does.
_NAMED_MASKS: dict[int, dict[Hashable, torch.Tensor]] = {}
_NAMED_LIMIT = 512


def _named_masks(compiled: Any) -> dict[Hashable, torch.Tensor]:
    """The named-state masks of ``compiled`` (created on first use)."""
    key = id(compiled)
    masks = _NAMED_MASKS.get(key)
    if masks is None:
        masks = _NAMED_MASKS[key] = {}
        weakref.finalize(compiled, _NAMED_MASKS.pop, key, None)
    return masks


class _OnceMap:
    """A thread-safe map that builds each missing value exactly once.

    The first caller of a key runs the factory outside the lock; concurrent callers of the
    same key wait for its result, callers of other keys proceed (compiling two different
    grammars in parallel is fine, compiling one grammar twice is a waste of seconds).
    A failed build is forgotten so the next call retries. With `limit`, the least recently
    used entries are dropped beyond it.
    """

    def __init__(self, limit: int | None = None) -> None:
        """Create an empty map holding at most `limit` values (None: unbounded)."""
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, Future[Any]] = OrderedDict()
        self._limit = limit

    def get(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        """Return the value for `key`, building it with `factory` if absent."""
        with self._lock:
            future = self._items.get(key)
            owner = future is None
            if future is None:
                future = self._items[key] = Future()
                if self._limit is not None and len(self._items) > self._limit:
                    self._items.popitem(last=False)
            else:
                self._items.move_to_end(key)
        if not owner:
            return future.result()
        try:
            future.set_result(factory())
        except BaseException as exc:
            future.set_exception(exc)
            with self._lock:
                if self._items.get(key) is future:
                    del self._items[key]
            raise
        return future.result()

    def discard_if(self, predicate: Callable[[Hashable], bool]) -> None:
        """Forget every key for which `predicate` is true."""
        with self._lock:
            for key in [key for key in self._items if predicate(key)]:
                del self._items[key]

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._items.clear()


def _tokenizer_info(tokenizer: Any, vocab_size: int | None) -> xgr.TokenizerInfo:
    """Build xgrammar's view of the vocabulary, with special tokens made unwritable.

    xgrammar 0.2.8 does not recognise transformers 5 special tokens: it decodes
    ``<|im_start|>`` to its literal text, so a grammar that allows ``<`` and ``|`` would let
    the model emit the special token inside a title or a JSON string. A token whose text is
    empty counts as special for xgrammar (never allowed, except as a stop token), so we
    rebuild the info with every special token's text blanked, keeping the detected metadata.
    """
    try:
        base = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    except (ValueError, TypeError, AttributeError) as exc:
        msg = (
            f"cannot build a grammar vocabulary from {type(tokenizer).__name__}: {exc}; "
            "pass a Hugging Face tokenizer (PreTrainedTokenizerBase)"
        )
        raise ValueError(msg) from exc
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {int(i) for i, token in added.items() if getattr(token, "special", False)}
    size = base.vocab_size
    if not special - set(base.special_token_ids):
        return base  # xgrammar already treats them all as special
    encoded: list[str] = [""] * size  # ids with no token (model head padding) stay empty
    for text, index in tokenizer.get_vocab().items():
        if index < size and index not in special:
            encoded[index] = text
    return xgr.TokenizerInfo(
        encoded,
        base.vocab_type,
        vocab_size=size,
        stop_token_ids=base.stop_token_ids,
        add_prefix_space=base.add_prefix_space,
    )


class _Compiler:
    """The xgrammar `TokenizerInfo` and compiler of one (tokenizer, vocab size), with its grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int | None) -> None:
        """Build the tokenizer info (about 0.2-0.5 s for a 49k vocabulary)."""
        self.info = _tokenizer_info(tokenizer, vocab_size)
        # xgrammar's own cache is unbounded; ours below is bounded and keyed the same way.
        threads = max(1, min(8, os.cpu_count() or 1))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.grammars = _OnceMap(limit=_GRAMMARS_PER_TOKENIZER)
        self.vocab_bytes: list[bytes] = self.info.decoded_vocab  # what the grammar matches


# (id(tokenizer), vocab_size) -> _Compiler. Keyed by id() because tokenizers need not be
# hashable; a weakref per tokenizer tells when the id may be reused by another object.
_COMPILERS = _OnceMap()
_ALIVE: dict[int, Any] = {}  # id(tokenizer) -> weakref (or the tokenizer, if not weakref-able)
_ALIVE_LOCK = threading.Lock()
# Ids of garbage-collected tokenizers. The weakref callback only appends here (atomic, takes
# no lock: it may run inside any allocation, even one made while a lock is held); the next
# lookup drops their compilers.
_DEAD: list[int] = []


def _compiler_for(tokenizer: Any, vocab_size: int | None) -> _Compiler:
    """Return the cached `_Compiler` of this tokenizer object and vocab size."""
    ident = id(tokenizer)
    with _ALIVE_LOCK:
        while _DEAD:
            _forget_tokenizer(_DEAD.pop())
        ref = _ALIVE.get(ident)
        known = ref() if isinstance(ref, weakref.ref) else ref
        if known is not tokenizer:
            # A new tokenizer, or a dead one's id reused by a new object: drop stale entries.
            _forget_tokenizer(ident)
            try:
                _ALIVE[ident] = weakref.ref(tokenizer, lambda _ref, i=ident: _DEAD.append(i))
            except TypeError:
                # Not weakref-able: keep it alive so that its id cannot be reused under us.
                _ALIVE[ident] = tokenizer
    return _COMPILERS.get((ident, vocab_size), lambda: _Compiler(tokenizer, vocab_size))


def _forget_tokenizer(ident: int) -> None:
    """Drop the cached compilers of the tokenizer with this id (caller holds `_ALIVE_LOCK`)."""
    ref = _ALIVE.get(ident)
    if isinstance(ref, weakref.ref) and ref() is not None:
        return  # a live tokenizer took this id since the callback ran
    _ALIVE.pop(ident, None)
    _COMPILERS.discard_if(lambda key: key[0] == ident)


def clear_grammar_cache() -> None:
    """Drop every cached tokenizer vocabulary and compiled grammar (e.g. in tests)."""
    with _ALIVE_LOCK:
        _ALIVE.clear()
        _COMPILERS.clear()


class GrammarConstraint:
    """Per-call grammar state: which tokens may come next, and what has been accepted.

    Build one with `from_ebnf` or `from_json_schema` for each decode; the compiled grammar
    behind it is shared and cached, the matcher state is this object's own (not thread-safe:
    use one constraint per decode). The decode loop calls `mask_logits` on the next-token
    logits, samples, calls `advance` with the chosen id, and stops when `is_terminated`.

    Stop tokens (the tokenizer's eos unless ``stop_token_ids`` is given) are allowed once the
    grammar is complete; accepting one terminates the constraint. A grammar that is complete
    and can go on with nothing but a stop token, such as the Stage-1 plan after ``####%%%%``,
    also counts as terminated, so the loop does not spend a forward pass on the stop token.
    """

    def __init__(
        self,
        compiled: xgr.CompiledGrammar,
        *,
        stop_token_ids: Sequence[int] | None = None,
        token_to_text: Callable[[int], str] | None = None,
        vocab_bytes: Sequence[bytes] | None = None,
    ) -> None:
        """Wrap a compiled grammar; prefer `from_ebnf` and `from_json_schema`, which cache it.
        ``vocab_bytes``: each token's bytes as the grammar matches them (xgrammar's decoded
        vocabulary), for `accepted_text`; None reads them from the grammar when asked."""
        stops = None if stop_token_ids is None else [int(i) for i in stop_token_ids]
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stops)
        self._vocab_size = compiled.tokenizer_info.vocab_size
        self._stop_ids = torch.tensor(self._matcher.stop_token_ids, dtype=torch.long)
        self._token_to_text = token_to_text
        self._bitmask = xgr.allocate_token_bitmask(1, self._vocab_size)  # [1, ceil(V/32)] int32
        self._allowed: torch.Tensor | None = None  # [V] bool for the current state, lazily
        self._bit_shifts = torch.arange(32, dtype=torch.int32)
        # Masks of states a caller named (`name_state`), shared by every constraint on this
        # compiled grammar with these stop tokens.
        self._named = _named_masks(compiled)
        self._stops_key = tuple(self._matcher.stop_token_ids)
        self._state_name: Hashable | None = None
        self._vocab_bytes = vocab_bytes
        self._compiled = compiled
        self._accepted: list[int] = []

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_ebnf(
        cls,
        tokenizer: Any,
        ebnf: str,
        *,
        vocab_size: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        root_rule: str = "root",
    ) -> GrammarConstraint:
        """Build a constraint from an xgrammar EBNF grammar (GBNF dialect, ``root ::= ...``).

        Args:
            tokenizer: The Hugging Face tokenizer the model decodes with.
            ebnf: The grammar text; e.g. `langchain_parallel_reason.plan.plan_grammar_ebnf`.
            vocab_size: The model's logits width (``model.config.vocab_size``), often larger
                than ``len(tokenizer)``; None takes the tokenizer's size. Ids beyond the
                tokenizer's vocabulary are never allowed.
            stop_token_ids: Tokens that end the decode once the grammar is complete;
                default: the tokenizer's eos.
            root_rule: Name of the start rule.

        Raises:
            ValueError: If the grammar does not parse or the tokenizer is unsupported.
        """
        _check_vocab_size(vocab_size)
        compiler = _compiler_for(tokenizer, vocab_size)

        def compile_() -> xgr.CompiledGrammar:
            try:
                return compiler.compiler.compile_grammar(ebnf, root_rule_name=root_rule)
            except RuntimeError as exc:
                msg = f"invalid EBNF grammar: {exc}"
                raise ValueError(msg) from exc

        compiled = compiler.grammars.get(("ebnf", ebnf, root_rule), compile_)
        return cls(
            compiled,
            stop_token_ids=stop_token_ids,
            token_to_text=_decoder(tokenizer),
            vocab_bytes=compiler.vocab_bytes,
        )

    @classmethod
    def from_json_schema(
        cls,
        tokenizer: Any,
        schema: dict[str, Any] | str,
        *,
        vocab_size: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        any_whitespace: bool = False,
    ) -> GrammarConstraint:
        """Build a constraint that only lets the model write JSON valid for `schema`.

        The JSON is laid out like ``json.dumps`` (``", "`` and ``": "``, one line) unless
        `any_whitespace`: free whitespace lets a small model ramble in blank space.
        Properties come in schema order; extra properties are not allowed. Beware: xgrammar
        0.2.8 lets raw control characters (and no escapes) into strings with ``minLength`` or
        ``maxLength``, which ``json.loads`` rejects unless ``strict=False``; plain strings and
        ``pattern`` strings are correct.

        Args:
            tokenizer: The Hugging Face tokenizer the model decodes with.
            schema: A JSON schema, as a dict or a JSON string.
            vocab_size: The model's logits width; see `from_ebnf`.
            stop_token_ids: See `from_ebnf`.
            any_whitespace: Allow any whitespace between JSON tokens.

        Raises:
            ValueError: If the schema is not valid JSON or xgrammar cannot convert it.
        """
        _check_vocab_size(vocab_size)
        try:
            # One canonical text per schema for the cache key. Keys are not sorted: xgrammar
            # makes the model write properties in the schema's order, which is meaningful.
            text = json.dumps(json.loads(schema) if isinstance(schema, str) else schema)
        except (TypeError, ValueError) as exc:
            msg = f"schema is not valid JSON: {exc}"
            raise ValueError(msg) from exc
        compiler = _compiler_for(tokenizer, vocab_size)

        def compile_() -> xgr.CompiledGrammar:
            try:
                return compiler.compiler.compile_json_schema(text, any_whitespace=any_whitespace)
            except RuntimeError as exc:
                msg = f"cannot build a grammar from this JSON schema: {exc}"
                raise ValueError(msg) from exc

        compiled = compiler.grammars.get(("json", text, any_whitespace), compile_)
        return cls(
            compiled,
            stop_token_ids=stop_token_ids,
            token_to_text=_decoder(tokenizer),
            vocab_bytes=compiler.vocab_bytes,
        )

    # ---- state -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Width of the token mask: the `vocab_size` given at construction, or the tokenizer's."""
        return self._vocab_size

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end the decode once the grammar is complete."""
        return self._stop_ids.tolist()

    def _allowed_mask(self) -> torch.Tensor:
        """Return the CPU bool mask ``[V]`` of tokens allowed next (computed once per state)."""
        if self._matcher.is_terminated():
            # xgrammar raises a bare RuntimeError here; say what the caller did wrong.
            msg = "the grammar has terminated; stop decoding instead of asking for a mask"
            raise RuntimeError(msg)
        if self._allowed is None and self._state_name is not None:
            self._allowed = self._named.get(self._state_name)  # computed by another constraint
        if self._allowed is None:
            self._matcher.fill_next_token_bitmask(self._bitmask)
            # Unpack 32 token bits per int32 word, low bit first: [W] -> [W, 32] -> [W*32].
            bits = (self._bitmask[0].unsqueeze(-1) >> self._bit_shifts) & 1
            self._allowed = bits.reshape(-1)[: self._vocab_size].bool()  # never written to
            if self._state_name is not None and len(self._named) < _NAMED_LIMIT:
                self._named[self._state_name] = self._allowed
        return self._allowed

    def name_state(self, name: Hashable) -> None:
        """Say that the current state is the one every constraint on this compiled grammar is in
        under ``name``, so its token mask is computed once and shared (until the next advance).

        For states a caller can name from the text alone: the plan's preamble after n
        characters is one state whatever the characters (they all come from one character
        class), and its masks near the grammar's length bounds cost xgrammar 5-30 ms each on
        a 49k vocabulary, against 0.1-0.2 ms elsewhere. The caller vouches for the name; even
        a wrong one cannot let a forbidden token through, since ``advance`` still has the
        grammar itself accept every token.
        """
        if self._allowed is None:
            self._state_name = (self._stops_key, name)

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Return a copy of `logits` with every token the grammar forbids set to ``-inf``.

        Args:
            logits: One row of next-token logits, ``[V]`` or ``[1, V]``, on any device and of
                any float dtype, with ``V >= vocab_size``; columns beyond `vocab_size`
                (padding rows of the model's head) are masked too.

        Raises:
            ValueError: On a batch of rows or fewer columns than `vocab_size`.
            RuntimeError: If the constraint has already terminated.
        """
        if logits.dim() not in (1, 2) or (logits.dim() == 2 and logits.shape[0] != 1):
            msg = f"expected logits of shape [V] or [1, V], got {list(logits.shape)}"
            raise ValueError(msg)
        width = logits.shape[-1]
        if width < self._vocab_size:
            msg = (
                f"logits have {width} columns but the grammar covers {self._vocab_size} "
                "tokens; build the constraint with vocab_size=logits.shape[-1]"
            )
            raise ValueError(msg)
        allowed = self._allowed_mask()
        if width > self._vocab_size:
            allowed = torch.nn.functional.pad(allowed, (0, width - self._vocab_size))
        # One small host-to-device copy (V bytes); the fill itself stays on the logits' device.
        allowed = allowed.to(logits.device, non_blocking=True)
        return logits.masked_fill(~allowed, float("-inf"))

    def allowed_token_ids(self) -> list[int]:
        """Return the ids the grammar accepts next, in increasing order."""
        return self._allowed_mask().nonzero().flatten().tolist()

    def advance(self, token_id: int) -> None:
        """Accept `token_id` as the next token.

        Raises:
            ValueError: If the grammar does not allow this token here (or has terminated);
                the state is then unchanged.
        """
        token_id = int(token_id)
        if self._matcher.is_terminated():
            msg = f"token {token_id} is not allowed: the grammar has terminated"
            raise ValueError(msg)
        # Check the mask first (cached: the loop just used it for mask_logits). xgrammar alone
        # accepts a former stop token (empty text) as a no-op when stop_token_ids overrides it,
        # and logs a C++ warning for every rejected special token.
        in_range = 0 <= token_id < self._vocab_size
        if (
            not in_range
            or not self._allowed_mask()[token_id]
            or not self._matcher.accept_token(token_id)
        ):
            msg = (
                f"token {token_id} ({self._describe(token_id)}) is not allowed by the grammar here"
            )
            raise ValueError(msg)
        self._allowed = None
        self._state_name = None
        self._accepted.append(token_id)

    def accepted_text(self) -> str:
        """The text of the tokens accepted so far, as the grammar matched it (the tokens' own
        bytes: no tokenizer clean-up; an incomplete UTF-8 character shows as U+FFFD)."""
        if self._vocab_bytes is None:
            self._vocab_bytes = self._compiled.tokenizer_info.decoded_vocab
        vocab = self._vocab_bytes
        data = b"".join(vocab[t] for t in self._accepted if t not in self._stops_key)
        return data.decode("utf-8", errors="replace")

    def forced_text(self) -> str:
        """Return the text the grammar forces next, whatever the model picks ("" if none).

        E.g. after a plan title's first character nothing is forced, after its colon
        ``"......\\n####"`` is. A loop may prefill it instead of decoding it token by token.
        """
        if self._matcher.is_terminated():
            return ""
        return self._matcher.find_jump_forward_string()

    def is_completed(self) -> bool:
        """True when the text accepted so far is a complete match of the grammar."""
        return self._matcher.is_terminated() or self._matcher.is_completed()

    def is_terminated(self) -> bool:
        """True when decoding must stop: a stop token was accepted, or the grammar is
        complete and allows nothing but a stop token next."""
        if self._matcher.is_terminated():
            return True
        if not self._matcher.is_completed():
            return False
        allowed = self._allowed_mask().clone()
        allowed[self._stop_ids[self._stop_ids < self._vocab_size]] = False
        return not bool(allowed.any())

    def reset(self) -> None:
        """Return to the start of the grammar, forgetting every accepted token."""
        self._matcher.reset()
        self._allowed = None
        self._state_name = None
        self._accepted.clear()

    def _describe(self, token_id: int) -> str:
        """A short printable form of a token for error messages."""
        if not 0 <= token_id < self._vocab_size:
            return f"out of range 0..{self._vocab_size - 1}"
        if self._token_to_text is None:
            return "?"
        try:
            return repr(self._token_to_text(token_id))
        except Exception:  # a decoder failure must not hide the real error
            return "?"


def _check_vocab_size(vocab_size: int | None) -> None:
    """Reject a non-positive or non-integer vocab size early, with a clear message."""
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1
    ):
        msg = f"vocab_size must be a positive integer or None, got {vocab_size!r}"
        raise ValueError(msg)


def _decoder(tokenizer: Any) -> Callable[[int], str] | None:
    """Return a token-id-to-text function for error messages, if the tokenizer has one."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    return convert if callable(convert) else None
