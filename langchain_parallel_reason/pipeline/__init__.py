"""The three stages over one KV cache: plan -> parallel steps -> conclusion.

Contract: ``iter_answer(model, tokenizer, messages, config)`` yields ``ContentDelta`` (the next
piece of the final content, in order), ``StepDelta`` (live text of a parallel step, not content)
and stage events (``StageEvent`` subclasses, one per kind), and returns an ``AnswerResult``; the
ContentDelta texts concatenate to ``AnswerResult.content``. Stage 1 writes the plan after the
prompt in the same cache; when it does not validate it is re-sampled (tenacity; each retry with
a derived seed and a higher temperature, so the same call always gives the same answer), then
the answer falls back to ordinary sequential decoding, and the report says why. Budgets:
``max_tokens`` bounds every token the call writes, plan attempts included (they may spend at
most half of it, so a fallback keeps the rest). Every step and the conclusion run under a loop
guard and the caller's repetition controls (transformers' ``repetition_penalty`` /
``no_repeat_ngram_size``). Any failure of the parallel path (Stage 2 or 3) falls back the same
way. ``model`` may be a transformers model (run here) or a ``backend.Backend`` (e.g. the HTTP
backend of a server): the stages are written once, against the backend. A call is plain
sequential code; the local engine runs each call as a coroutine (runtime/engine.py), and
``machine.RequestMachine`` is the same call as a state machine: fed what a backend produced, it
answers with the next actions (decode these branches, cancel that one, done), so a driver with
no stage logic runs it anywhere (runtime/http.py on a server).

Modules, the arrows running one way: ``settings`` (PipelineConfig, bounds), ``events`` (what is
yielded) and ``backend`` (what the stages ask of a model or a server) <- ``render`` (prompts,
token ids) <- ``run`` (one call's state, Stage 1) <- ``route``, ``steps`` (Stages 2 and 3) <-
``blocks`` <- ``stages`` (``iter_answer``, ``answer``) <- ``machine`` (with ``actions``, what it
asks and is fed). The prompt templates come from ``prompts`` (LangChain's PromptTemplate); no
chat model is used here.
"""

from .events import (
    AnswerResult,
    ContentDelta,
    Event,
    FallbackEvent,
    PlanEvent,
    RouteEvent,
    StageEvent,
    StepDelta,
    StepsDoneEvent,
    StepsRetryEvent,
    TextStream,
    drive,
)
from .render import (
    block_report,
    check_question,
    marker_token_ids,
    merged_steps_text,
    render_prompt,
    resample_settings,
    step_opening_banned_ids,
    step_token_budget,
    steps_content,
    stop_token_ids,
    title_opening_ids,
    with_system,
)
from .route import choose_route
from .settings import (
    MIN_CONCLUSION_TOKENS,
    MIN_PLAN_TOKENS,
    MIN_STEP_TOKENS,
    PLAN_PREAMBLE_CHARS,
    PLAN_RETRY_TEMPERATURES,
    PLAN_TITLE_CHARS,
    ROUTE_BIAS,
    Mode,
    OutputGrammar,
    PipelineCancelled,
    PipelineConfig,
    forced_route,
)
from .stages import answer, iter_answer

__all__ = [
    "MIN_CONCLUSION_TOKENS",
    "MIN_PLAN_TOKENS",
    "MIN_STEP_TOKENS",
    "PLAN_PREAMBLE_CHARS",
    "PLAN_RETRY_TEMPERATURES",
    "PLAN_TITLE_CHARS",
    "ROUTE_BIAS",
    "AnswerResult",
    "ContentDelta",
    "Event",
    "FallbackEvent",
    "Mode",
    "OutputGrammar",
    "PipelineCancelled",
    "PipelineConfig",
    "PlanEvent",
    "RouteEvent",
    "StageEvent",
    "StepDelta",
    "StepsDoneEvent",
    "StepsRetryEvent",
    "TextStream",
    "answer",
    "block_report",
    "check_question",
    "choose_route",
    "drive",
    "forced_route",
    "iter_answer",
    "marker_token_ids",
    "merged_steps_text",
    "render_prompt",
    "resample_settings",
    "step_opening_banned_ids",
    "step_token_budget",
    "steps_content",
    "stop_token_ids",
    "title_opening_ids",
    "with_system",
]
