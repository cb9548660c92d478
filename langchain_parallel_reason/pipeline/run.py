"""``Run``: the state of one call (model, tokenizer, messages, settings, budgets, notes) and
Stage 1, the plan written after the prompt in the same cache, retried with derived seeds.

Contract: a ``Run`` is used by one call on one thread; ``Run.plan`` returns a validated plan or
raises ``PlanFormatError`` after the retries, never spending more than half of ``max_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_attempt

from ..decoding.repetition import RepetitionControl
from ..decoding.sampling import SamplingParams
from ..plan import PlanFormatError, parse_plan, plan_grammar_ebnf
from ..prompts import (
    END_MARKER,
    example_titles,
)
from ..schemas import Plan
from ..titles import MIN_CANDIDATES, title_candidates
from .backend import as_backend
from .events import BlockEnd, drive
from .render import (
    DistinctTitles,
    NoPlanRetry,
    resample_settings,
)
from .settings import MIN_PLAN_TOKENS, PLAN_PREAMBLE_CHARS, PLAN_TITLE_CHARS, forced_route

__all__ = [
    "Run",
]


class Run:
    """State of one ``iter_answer`` call (nothing survives the call)."""

    def __init__(self, model, tokenizer, messages, config, cancel, tools) -> None:
        # A model (run in this process) or a backend (a server): see pipeline/backend.py.
        self.backend = as_backend(model, tokenizer)
        self.tok = tokenizer
        self.messages = messages
        self.cfg = config
        self.cancel = cancel
        self.tools = tools
        self.params = SamplingParams(config.temperature, config.top_p, config.top_k)
        self.repetition = RepetitionControl(config.repetition_penalty, config.no_repeat_ngram_size)
        self.stop_ids = self.backend.stop_ids
        self.ctx = self.backend.context_window
        self.device = self.backend.device
        self.timings: dict[str, float] = {}
        self.output_tokens = 0
        self.input_tokens = 0
        self.plan_attempts = 0
        self.last_plan_error = ""
        self.notes: list[str] = []
        self.route, self.route_reason = forced_route(config)
        self.block_end: BlockEnd | None = None  # how the last conclusion ended
        self.titles: str | None = None  # "question" or "free" once a plan was decoded
        self.step_kind: str | None = None  # "check" or "paragraph" once steps are decoded

    def question(self) -> str:
        """The last user message's text ("" when there is none)."""
        user = [m for m in self.messages if m.get("role") == "user"]
        return str(user[-1].get("content") or "").strip() if user else ""

    def own_texts(self) -> list[str]:
        """Every text the caller wrote: the messages' contents, the given steps, the tools'
        schemas (what the answer may take words from)."""
        texts = [str(m.get("content") or "") for m in self.messages]
        texts += list(self.cfg.steps or ())
        if self.tools:
            texts.append(json.dumps(self.tools, default=str))
        return texts

    def grounded_titles(self) -> list[str] | None:
        """The titles the plan grammar offers (`titles.title_candidates` of the question), or
        None for free titles: fewer than 2 candidates, or an unconstrained plan."""
        if not self.cfg.constrain_plan:
            return None
        found = title_candidates(self.question(), max_chars=PLAN_TITLE_CHARS)
        return found if len(found) >= MIN_CANDIDATES else None

    def encode(self, text: str) -> list[int]:
        # Step titles and texts are data: text spelling a special token stays text.
        split = not self.cfg.parse_special_tokens
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=split)

    def check_prompt(self, ids: list[int]) -> None:
        if len(ids) >= self.ctx:
            msg = (
                f"the prompt has {len(ids)} tokens but the model's context window is {self.ctx}; "
                f"shorten the messages or {self.backend.longer_context}"
            )
            raise ValueError(msg)

    # Stage 1 ----------------------------------------------------------------------------
    def plan(
        self,
        prompt: list[int],
        cache: Any,
        *,
        cap: int | None = None,
        preamble: bool = True,
    ) -> tuple[Plan, list[int], int]:
        """Decode and validate the plan; returns (plan, plan token ids, attempts).

        Attempts spend at most half of ``max_tokens`` together (the rest is the answer's,
        fallback included) and never run past the context window. A retry is made only when
        a plan can fit in what is left (`MIN_PLAN_TOKENS`, or ``plan_max_tokens`` if smaller);
        it samples at a higher temperature with a seed derived from the call's (0 without one,
        at temperature 0), so the same call gives the same plan. ``cap`` replaces that half
        (a later block's plan); ``preamble=False`` plans without the preamble line.
        """
        cfg = self.cfg
        self.plan_attempts = 0
        cap = cfg.max_tokens // 2 if cap is None else cap
        # Titles taken from the question when it lists its parts: a small model asked to
        # name them in its own words named the question's parts in 3 of 14 plans (issue 21).
        # A later block (no preamble) plans what the first block left: free titles.
        grounded = self.grounded_titles() if preamble else None
        if preamble:
            self.titles = "free" if grounded is None else "question"
        grammar = (
            plan_grammar_ebnf(
                cfg.max_branches,
                PLAN_TITLE_CHARS,
                PLAN_PREAMBLE_CHARS,
                preamble=preamble,
                titles=grounded,
            )
            if cfg.constrain_plan
            else None
        )

        def rest_grammar(done_steps: int) -> str | None:
            # The plan from a title start on, for a backend that continues a cut plan (a
            # grounded plan's grammar keeps its titles distinct itself: no rest for it).
            if grammar is None:
                return None
            return plan_grammar_ebnf(cfg.max_branches, PLAN_TITLE_CHARS, done_steps=done_steps)

        spent = 0

        def attempt() -> tuple[Plan, list[int]]:
            nonlocal spent
            budget = min(cfg.plan_max_tokens, cap - spent, self.ctx - len(prompt))
            if budget < min(MIN_PLAN_TOKENS, cfg.plan_max_tokens) and self.plan_attempts > 0:
                raise NoPlanRetry(
                    f"{self.last_plan_error}; no retry: {max(budget, 0)} plan tokens left of "
                    f"max_tokens={cfg.max_tokens} (plan attempts may use half)"
                )
            if budget < 1:
                raise NoPlanRetry(f"no room for a plan (max_tokens={cfg.max_tokens})")
            self.plan_attempts += 1
            k = self.plan_attempts
            # Each attempt restarts from the prompt.
            self.backend.crop(cache, len(prompt) - 1)
            temperature, seed = resample_settings(self.params.temperature, cfg.seed, k)
            params = replace(self.params, temperature=temperature)
            constraint = DistinctTitles(
                self.backend.grammar(ebnf=grammar) if grammar else None,
                self.tok,
                rest=rest_grammar if grounded is None else None,
                preamble=preamble,
            )
            gen = self.backend.iter_decode(
                prompt[-1:],
                cache,
                start=len(prompt) - 1,
                max_new_tokens=budget,
                params=params,
                seed=seed,
                stop_token_ids=self.stop_ids,
                stop_strings=() if grammar else (END_MARKER,),
                tokenizer=self.tok,
                constraint=constraint,
                cancel=self.cancel,
            )
            result = drive(gen, [])
            spent += len(result.token_ids)
            self.output_tokens += len(result.token_ids)
            text = self.tok.decode(result.token_ids, skip_special_tokens=True)
            try:
                plan = self.drop_copied_titles(
                    parse_plan(
                        text, max_branches=cfg.max_branches, max_title_chars=PLAN_TITLE_CHARS
                    )
                )
            except PlanFormatError as e:
                self.last_plan_error = str(e)
                raise
            return plan, result.token_ids

        # The prompt but its last token is prefilled once; every attempt feeds that last token.
        if len(prompt) > 1 and cache.get_seq_length() == 0:
            self.backend.forward_tokens(prompt[:-1], cache, 0)
        retrying = Retrying(
            stop=stop_after_attempt(cfg.plan_retries + 1),
            retry=retry_if_exception(
                lambda e: isinstance(e, PlanFormatError) and not isinstance(e, NoPlanRetry)
            ),
            reraise=True,
        )
        plan, ids = retrying(attempt)
        return plan, ids, self.plan_attempts

    def drop_copied_titles(self, plan: Plan) -> Plan:
        """``plan`` without titles copied from the prompt's example (unless the question uses
        them); raises PlanFormatError when fewer than 2 titles remain."""
        question = " ".join(
            str(m.get("content") or "") for m in self.messages if m.get("role") == "user"
        ).casefold()
        copied = example_titles()
        kept = [t for t in plan.titles if t.casefold() not in copied or t.casefold() in question]
        if len(kept) == len(plan.titles):
            return plan
        if len(kept) < 2:
            dropped = [t for t in plan.titles if t not in kept]
            msg = f"fewer than 2 usable titles (copied from the prompt's example: {dropped})"
            raise PlanFormatError(msg)
        return plan.model_copy(update={"titles": kept})

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size
