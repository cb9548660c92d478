"""What a ``machine.RequestMachine`` asks of a backend (actions) and is fed back (events),
and the data they carry. Plain frozen data: no behaviour, no I/O.

Contract: a driver executes ``Decode``, ``Cancel`` and ``Choose``, passes ``Emit``'s event on and
stops at ``Done``; it feeds ``Tokens`` and ``Ended`` for every branch of a decode it did not
cancel, ``Scores`` for a choice, ``Failed`` for an operation that failed. ``op`` numbers an
operation within one machine. A driver that holds KV caches in-process (runtime/local_driver.py)
also replays each decode's ``replay`` on its cache ``cache``, feeds ``Decoded`` when a decode
is over, and executes ``LayOut`` (only asked where ``BackendInfo.kv_reuse_problem``
is None), answering ``LaidOut``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..decoding.repetition import RepetitionControl
from ..decoding.sampling import SamplingParams, SuppressFirst
from .events import AnswerResult, Event

__all__ = [
    "Action",
    "BackendInfo",
    "Cancel",
    "Choose",
    "Decode",
    "DecodeSettings",
    "Decoded",
    "Done",
    "Emit",
    "Ended",
    "Failed",
    "Grammar",
    "LaidOut",
    "LayOut",
    "MachineEvent",
    "Scores",
    "TokenCache",
    "Tokens",
]


@dataclass
class Grammar:
    """A grammar the backend enforces itself (a server's structured output); ``completed`` is
    set when the decode under it ended by the grammar's own end (finish reason "stop")."""

    ebnf: str | None = None
    json_schema: Any = None
    completed: bool = False

    def is_completed(self) -> bool:
        """Whether the grammar's text was complete."""
        return self.completed


@dataclass
class TokenCache:
    """A sequence: the ids the next decode sends as its context."""

    ids: list[int] = field(default_factory=list)
    key: int = 0
    """Names the sequence to a driver that keeps a KV cache per sequence."""
    replay: list[tuple[Any, ...]] = field(default_factory=list)
    """The stages' feeds ``("feed", start, ids)`` and crops ``("crop", length)`` since the last
    decode on it: a KV-holding driver repeats them, so its forwards are the stages' own."""
    branch_rows: list[list[int]] = field(default_factory=list)
    """Per branch decoded after it with ``keep_kv``: forced and new ids (for ``LayOut``)."""

    def get_seq_length(self) -> int:
        """Tokens held."""
        return len(self.ids)


@dataclass(frozen=True)
class BackendInfo:
    """What the stages need from a backend that is not an operation."""

    name: str
    """How the steps are decoded, for the report's ``attention``."""
    context_window: int
    """Most tokens a sequence may hold."""
    stop_ids: list[int]
    """Token ids that end an answer (EOS)."""
    vocab_size: int
    """Size of the vocabulary (the router's log-probabilities are laid out over it)."""
    longer_context: str = "use a model with a longer context"
    """How to get a longer context window (for the error of a prompt that does not fit)."""
    grammar: Callable[..., Any] | None = None
    """Builds a constraint from ``ebnf=`` or ``json_schema=`` (and ``stop_token_ids=``) for a
    backend that masks logits itself; None: a ``Grammar`` the backend enforces."""
    kv_reuse_problem: str | None = (
        "the server prefills the laid-out steps from its own prefix cache"
    )
    """Why Stage 3 cannot lay the steps' own KV out (None: the driver executes ``LayOut``)."""
    reports_decodes: bool = False
    """The driver feeds ``Decoded`` once each decode's branches all ended or were cancelled
    (an in-process decoder), and the machine waits for it."""


@dataclass(frozen=True)
class DecodeSettings:
    """What a ``Decode`` samples under, as the stages pass it to a decoder."""

    params: SamplingParams | None = None
    """Temperature, top_p, top_k (None: greedy)."""
    stop_token_ids: tuple[int, ...] = ()
    """Ids that end a branch (the machine checks them too)."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a branch (the machine checks them too)."""
    suppress: SuppressFirst | None = None
    """Ids banned for a branch's first ``suppress.count`` tokens (stop ids among them)."""
    opening_banned_ids: tuple[tuple[int, ...], ...] | None = None
    """Per branch, ids its first token may not be."""
    repetition: RepetitionControl | None = None
    """The caller's repetition controls (penalty, no-repeat n-grams, banned words)."""
    repetition_context: tuple[int, ...] = ()
    """Ids counted by the repetition controls besides the decode's context."""
    constraint: Any = None
    """A grammar (``BackendInfo.grammar``'s, or a ``Grammar``), maybe wrapped (``.inner``)."""
    jump_forward: bool = False
    """Whether text the grammar forces may be fed in one pass."""
    loop_guard: bool = False
    """Whether the loop guard ends a repeating branch (the machine checks it)."""
    step_opening: bool = False
    """A paragraph step's opening bans apply (a server sends the step-opening regex)."""
    line_goes_on: tuple[bool, ...] = ()
    """Per branch (one for a single continuation; empty: none), whether its first token may
    not end the line: a check step whose record goes on (a server sends a regex for it)."""
    attention: str = "auto"
    """The local belt decoder's backend ("auto", "split" or "mask"); a server ignores it."""
    keep_kv: bool = False
    """Return the branches' KV (``Decoded``) for a ``LayOut``; only with a KV-holding driver."""

    @property
    def min_tokens(self) -> int:
        """New tokens before a stop may end a branch (the first tokens' bans)."""
        return int(self.suppress.count) if self.suppress is not None else 0

    @property
    def grammar(self) -> Any:
        """The constraint's grammar (the plan's distinct-titles rule wraps it as ``inner``)."""
        return getattr(self.constraint, "inner", self.constraint)


# -- actions (machine -> driver) -------------------------------------------------------------
@dataclass(frozen=True)
class Emit:
    """Pass ``event`` on (``ContentDelta``, ``StepDelta``, a stage event)."""

    event: Event


@dataclass(frozen=True)
class Decode:
    """Decode each branch b after ``context_ids + branch_prefixes[b]`` (all at once), at most
    ``budgets[b]`` tokens, sampled with ``seeds[b]``; feed ``Tokens`` then ``Ended`` for each."""

    op: int
    context_ids: tuple[int, ...]
    branch_prefixes: tuple[tuple[int, ...], ...]
    budgets: tuple[int, ...]
    seeds: tuple[int | None, ...]
    settings: DecodeSettings
    cache: int = 0
    """The sequence (``TokenCache.key``) whose KV holds the context, for a KV-holding driver."""
    replay: tuple[tuple[Any, ...], ...] = ()
    """``TokenCache.replay``: what a KV-holding driver does to that cache first."""
    start: int = -1
    """Where the ids the decoder feeds itself begin in ``context_ids`` (-1: at its end)."""


@dataclass(frozen=True)
class Cancel:
    """Close branch ``branch``'s stream of decode ``op``; feed nothing more for it."""

    op: int
    branch: int


@dataclass(frozen=True)
class Choose:
    """One token after ``context_ids`` among ``choice_ids`` (the router's yes/no): feed their
    ``Scores`` (log-probabilities; the machine samples)."""

    op: int
    context_ids: tuple[int, ...]
    choice_ids: tuple[int, ...]


@dataclass(frozen=True)
class LayOut:
    """Lay ``kvs`` (per branch, per layer keys and values from ``Decoded``) and ``glue_ids``
    out after cache ``cache`` (``decoding.merge``), after replaying ``replay``; feed
    ``LaidOut``. Asked only where ``BackendInfo.kv_reuse_problem`` is None."""

    op: int
    cache: int
    replay: tuple[tuple[Any, ...], ...]
    kvs: Any
    glue_ids: Any


@dataclass(frozen=True)
class Done:
    """The request is answered: ``result`` is ``iter_answer``'s ``AnswerResult``."""

    result: AnswerResult


Action = Emit | Decode | Cancel | Choose | LayOut | Done


# -- events (driver -> machine) --------------------------------------------------------------
@dataclass(frozen=True)
class Tokens:
    """New token ids of branch ``branch`` of decode ``op``, in order."""

    op: int
    branch: int
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Ended:
    """Branch ``branch`` of decode ``op`` ended by itself (``reason``: "length" or other)."""

    op: int
    branch: int
    reason: str


@dataclass(frozen=True)
class Scores:
    """The log-probabilities of a ``Choose``'s ids (others may be missing)."""

    op: int
    logprobs: dict[int, float]
    logits: Any = None
    """An in-process driver's whole logits row ``[V]``: the machine masks and samples it as
    the local decoder would (its dtype, its device's generator); ``logprobs`` are then unused."""


@dataclass(frozen=True)
class Decoded:
    """What an in-process decoder returned for decode ``op`` (its ``BranchesOutput`` or
    ``SequentialResult``: forward passes, attention, the branches' KV), fed once every branch
    ended or was cancelled (``BackendInfo.reports_decodes``); the machine takes its counts and
    KV, and keeps its own tokens and ends."""

    op: int
    output: Any


@dataclass(frozen=True)
class LaidOut:
    """``LayOut`` ``op`` is done: the cache holds the row."""

    op: int


@dataclass(frozen=True)
class Failed:
    """Operation ``op`` failed: ``error`` is raised in the pipeline where it waits on it."""

    op: int
    error: BaseException


MachineEvent = Tokens | Ended | Scores | Decoded | LaidOut | Failed
