"""ChatParallelReason: the LangChain chat model over the three-stage parallel pipeline.

Contract: a thin adapter. It converts LangChain messages to chat-template dicts (`messages`),
maps its fields (and per-call overrides) to one `PipelineConfig` (`call_settings.pipeline_config`,
the only mapping), reads the answer's form from the call kwargs (`output_forms`), hands the call
to the runtime's engine, and turns the pipeline's events into message chunks.
Constructing never loads weights; the model loads once, on first use.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import tools as _tools
from .call_settings import (
    CALL_OPTIONS,
    call_overrides,
    check_field_names,
    check_timeout,
    pipeline_config,
    validate_steps,
)
from .chunks import chat_result, event_chunk, final_chunk
from .messages import convert_messages
from .output_forms import OutputForm, bound_tools, structured_output
from .runtime import DEFAULT_MODEL_NAME, EngineLimits, Request, open_engine
from .setting_bounds import bounds

if TYPE_CHECKING:
    from langchain_core.language_models import LanguageModelInput
    from langchain_core.tools import BaseTool

    from .pipeline import PipelineConfig
    from .runtime.engine import Engine
    from .runtime.remote import RemoteEngine

__all__ = ["ChatParallelReason"]

_PROVIDER = "parallel-reason"


# ------------------------------------------------------------------------------ the model


class ChatParallelReason(BaseChatModel):
    r"""Chat model that decodes independent reasoning steps in parallel in one sequence.

    Any local transformers causal LM with a chat template works. Stage 1 plans the
    independent steps, Stage 2 decodes all of them at once (one token per step per forward
    pass, "belt" attention mask), Stage 3 writes the conclusion; one merged `AIMessage`
    comes back. When the plan does not validate the answer falls back to ordinary
    decoding, and `response_metadata["parallel"]` says why.

    Setup:
        ```bash
        pip install langchain-parallel-reason
        ```
        With `model=None` the embedded SmolLM2-135M-Instruct is used (no download).

    Key init args — generation params:
        max_tokens: int
            Total new-token budget (plan + steps + conclusion).
        temperature: float
            0 is greedy; with `seed` sampling is reproducible.
        steps: list[str] | None
            Step titles to decode in parallel; skips Stage 1.
        mode: "auto" | "parallel" | "sequential" | "stepped"

    Key init args — client params:
        model: str | None
            A local folder, `.gguf` file, or hub id; None for the embedded model.
        timeout: float | None
            Seconds per call; a call that runs over is cancelled and raises `TimeoutError`.

    Instantiate:
        ```python
        from langchain_parallel_reason import ChatParallelReason

        llm = ChatParallelReason(max_tokens=256, temperature=0.0)
        # or over a model you loaded yourself:
        llm = ChatParallelReason.from_model(model, tokenizer, max_tokens=256)
        ```

    Invoke:
        ```python
        msg = llm.invoke("Compare Paris and Rome as holiday destinations.")
        msg.content
        msg.response_metadata["parallel"]["mode_used"]  # "parallel", "sequential" or "stepped"
        msg.usage_metadata  # {"input_tokens": ..., "output_tokens": ..., "total_tokens": ...}
        ```

    Stream (content chunks, plus live step text in `additional_kwargs`):
        ```python
        for chunk in llm.stream("Plan a 3-day trip to Rome."):
            for part in chunk.additional_kwargs.get("parallel_steps", []):
                print(part["step"], part["title"], part["text"])
            print(chunk.content, end="")
        ```

    Per-call overrides:
        ```python
        llm.invoke("...", steps=["Pros", "Cons"], max_tokens=128, seed=7)
        llm.bind(mode="sequential").invoke("...")
        ```

    Async (never blocks the event loop; cancelling the task stops decoding):
        ```python
        await llm.ainvoke("...")
        await llm.abatch(["...", "..."])
        ```

    Tool calling (a forced call is decoded under a grammar from the tool's schema):
        ```python
        msg = llm.bind_tools([multiply], tool_choice="any").invoke("What is 6 times 7?")
        msg.tool_calls  # [{"name": "multiply", "args": {"a": 6, "b": 7}, "id": ...}]
        ```

    Structured output (grammar-constrained JSON; Pydantic, TypedDict or JSON schema):
        ```python
        llm.with_structured_output(Joke).invoke("Tell me a joke about cats.")  # a Joke
        ```
    """

    model: str | None = None
    """Model to load: a local folder, a `.gguf` file or a hub id; None = the embedded default
    (SmolLM2-135M-Instruct, converted once to a cache folder). Ignored by `from_model`. With
    `base_url`: the server's served model name (None = the only one it serves)."""

    base_url: str | None = None
    """An OpenAI-compatible server (vLLM, SGLang) that runs the model, e.g.
    ``"http://127.0.0.1:8000/v1"``: the three stages run there and nothing loads here (the
    loading fields, `attention` and `num_threads` are then unused)."""

    api_key: SecretStr | None = None
    """Bearer token for `base_url` (the server's ``--api-key``)."""

    gguf_file: str | None = None
    """GGUF file name inside `model` (a folder or hub repository) to load and dequantize."""

    device: str | None = None
    """Torch device to run on, e.g. "cpu" or "cuda"; None picks automatically."""

    dtype: str | None = "auto"
    """"auto" (= None: the fastest here, `loading.auto_dtype`), "float32" (exact), "bfloat16"."""

    device_map: str | dict[str, Any] | None = None
    """Passed to `from_pretrained` for multi-device placement (e.g. "auto")."""

    attn_implementation: str | None = None
    """transformers attention implementation for the ordinary stages, e.g. "sdpa" or "eager"."""

    trust_remote_code: bool = False
    """Allow model code from the model's folder or repository (only for models you trust)."""

    mode: Literal["auto", "parallel", "sequential", "stepped"] = "auto"
    """"auto": the model first chooses between a plan and a direct answer (see
    `route_bias`); "parallel": always a plan. A plan's steps are decoded in parallel, falling
    back to ordinary decoding when it does not validate ("parallel" reports that as a failure
    of the requested mode); "sequential" never plans; "stepped" is the paper's baseline: always
    a plan, its steps written one after another by ordinary decoding, the same conclusion.
    `steps` forces a plan."""

    steps: list[str] | None = None
    """Step titles to decode in parallel, in order; Stage 1 (planning) is skipped. Mode
    "sequential" never plans: steps with it are a ValueError."""

    max_branches: int = Field(default=6, **bounds("max_branches"))
    """Most steps decoded in parallel (at least 2)."""

    max_tokens: int = Field(default=512, **bounds("max_tokens"))
    """Total new-token budget of one answer: plan, steps and conclusion together."""

    step_max_tokens: int = Field(default=96, **bounds("step_max_tokens"))
    """New tokens each parallel step may take."""

    plan_max_tokens: int = Field(default=96, **bounds("plan_max_tokens"))
    """New tokens the Stage-1 plan may take."""

    plan_retries: int = Field(default=2, **bounds("plan_retries"))
    """Re-samples of a plan that does not validate before falling back to ordinary decoding;
    each with a derived seed and a higher temperature (the same call gives the same answer),
    and all attempts together spend at most half of `max_tokens`."""

    constrain_plan: bool = True
    """Force the plan's format with a grammar (small models rarely write it unaided)."""

    max_blocks: int = Field(default=1, **bounds("max_blocks"))
    """Most parallel blocks in one answer: after a block's conclusion the model may open
    another plan (it writes ``####``), whose steps are again decoded in parallel, until this
    many blocks ran. 1 (the default) cuts the conclusion there: the embedded 135M model's
    later blocks mostly restate the first (README, "Several blocks")."""

    route_bias: float = Field(default=0.75, allow_inf_nan=False, **bounds("route_bias"))
    """In mode "auto" without `steps`, the model first answers yes (plan) or no (direct
    answer) to "should the answer be split into several independent parts?"; this is added
    to its "yes" logit (higher: plan more often). The default is calibrated on the embedded
    SmolLM2-135M; the report's ``route_reason`` shows the model's own log-odds. Values past
    +-1e4 are refused (far past them the logits overflow); `mode` always or never plans."""

    temperature: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    """Sampling temperature; 0 is greedy (argmax)."""

    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`."""

    top_k: int = Field(default=0, ge=0)
    """Keep only the `top_k` most likely tokens; 0 keeps all."""

    seed: int | None = Field(default=None, ge=-(2**62), le=2**62)
    """Seed of the sampling generator: the same seed gives the same answer (|seed| <= 2**62)."""

    repetition_penalty: float | None = Field(
        default=None, allow_inf_nan=False, **bounds("repetition_penalty")
    )
    """As in transformers' `generate`: a token already in the context (prompt included) has its
    logit divided by this when positive, multiplied when negative; applied to each parallel
    step over its own context, and to the conclusion or a sequential answer. None or 1.0 = off;
    1.1-1.3 discourages loops. (Every step and the conclusion also stop at a loop anyway.)
    Values outside [0.01, 100] are refused: they would overflow the logits."""

    no_repeat_ngram_size: int | None = Field(default=None, ge=0)
    """As in transformers' `generate`: no n-gram of this size may occur twice in a step's (or
    the conclusion's) context, prompt included. None or 0 = off."""

    stop: list[str] | None = None
    """Stop strings: one ends the answer (inside a parallel step it ends that step only)."""

    timeout: Annotated[float | None, AfterValidator(check_timeout)] = Field(default=None, gt=0)
    """Seconds one call may take (waiting for the model included, first load excluded); a
    call that runs over is cancelled and raises `TimeoutError`. At most one day (86400);
    None = no limit."""

    max_retries: int = Field(default=0, ge=0)
    """Retries of a call that fails with an error that can pass (out of memory, a dropped
    connection) before any text was produced, with exponential backoff (0.1 s doubling, at
    most 2 s) and never past `timeout`. Other errors recur on the same input and are raised
    at once."""

    streaming: bool = False
    """Stream by default: `invoke` then runs through `_stream` (callbacks get each token)."""

    attention: Literal["auto", "split", "mask"] = "auto"
    """Stage-2 attention backend: "split" (shared prefix + per-branch, merged), "mask" (one
    4D belt mask) or "auto"."""

    conclusion_kv: Literal["reprefill", "reuse"] = "reprefill"
    """How the conclusion sees the parallel steps: "reprefill" prefills their text after the
    prefix (as the paper does); "reuse" lays their own KV from Stage 2 out in a row (keys
    re-rotated to sequential positions), skipping that prefill. Llama, Qwen2/3, Mistral and
    Phi3 without a sliding window; other models re-prefill, with a note."""

    num_threads: int | None = Field(default=None, ge=1, le=4096)
    """CPU threads for the model's forwards; None = the cores this process may use
    (`os.sched_getaffinity`). Larger values are capped at that count, and the engine uses no
    more than the cores other processes leave free (sampled every quarter second): more
    threads than cores only wait on each other."""

    progress: bool = True
    """Show progress while the model loads or is converted the first time."""

    max_concurrent_requests: int = Field(default=32, ge=1, le=1024)
    """Calls one model serves at once (each holds its KV); more wait in a FIFO queue. Chat
    models over the same model share its engine: the first one's limits apply."""

    max_batch_rows: int = Field(default=512, ge=1, le=65536)
    """Most tokens one forward pass takes over all live calls; longer prompts are prefilled
    in chunks of this size between decode steps."""

    kv_budget_bytes: int | None = Field(default=None, ge=1)
    """KV-cache bytes the running calls may reserve together (each reserves an upper bound
    at admission); calls beyond it wait. None = no budget."""

    prefix_cache_bytes: int = Field(default=256 * 2**20, ge=0)
    """KV-cache bytes of prompt prefixes kept across calls (a radix tree, as vLLM's and
    SGLang's prefix caching): a prompt that starts like an earlier one (the planning
    instructions, a shared system prompt, a tool list) prefills only what differs. 0 = off."""

    json_string_max_chars: int | None = Field(default=160, ge=1)
    """Longest string a forced tool call or structured output may hold where its schema sets
    no bound (no ``maxLength``, ``pattern`` or ``enum``); None = unbounded. Small models tend
    to loop inside a string until the token budget runs out; capped strings cannot hold
    quotes, backslashes or newlines."""

    parse_special_tokens: bool = False
    """Read text that spells one of the tokenizer's special tokens (e.g. ``<|im_end|>``) in
    message content, tool output and step titles as that control token, as transformers' chat
    pipelines do. False (the default): such text is tokenized as plain text, so untrusted
    input cannot end a turn or forge a role; only the chat template's own control tokens are
    special. Set True only for input you trust that relies on writing control tokens."""

    _engine: Engine | None = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)  # from_model's own (None: the engine's)
    _remote: RemoteEngine | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _check_field_names(cls, values: Any) -> Any:
        """Refuse a misspelled field (pydantic would drop it silently), naming the closest."""
        return check_field_names(cls, values)

    @field_validator("model", "gguf_file")
    @classmethod
    def _check_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Refuse an empty name: as a path it would be the current directory."""
        if value is not None and not value.strip():
            msg = (
                f"{info.field_name}={value!r} is empty: pass a local folder, a .gguf file or a "
                "hub id, or None for the embedded SmolLM2-135M-Instruct"
            )
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _check_steps(self) -> Self:
        """Reject `steps` that cannot form a plan (count, empty or duplicate titles, mode)."""
        if self.steps is not None:
            validate_steps(self.steps, self.max_branches, self.mode)
        return self

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, **kwargs: Any) -> Self:
        """Build a chat model over an already loaded transformers model and tokenizer.

        Nothing is loaded or copied; chat models over the same model object share one engine
        (one batch, one queue).
        `kwargs` are the usual fields (`max_tokens`, `temperature`, ...); `model` (a name
        for metadata) defaults to the model's `name_or_path`.

        Raises:
            ValueError: The tokenizer has no chat template.
        """
        chat = cls(**kwargs)
        chat._engine = open_engine(  # the door checks the chat template
            loaded=(model, tokenizer), name=kwargs.get("model"), limits=chat._limits()
        )
        chat._tokenizer = tokenizer
        return chat

    # -- LangChain identity -----------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "parallel-reason"

    @property
    def _model_name(self) -> str:
        if self._remote is not None:
            return self._remote.name
        if self.model:
            return self.model
        return self._engine.name if self._engine is not None else DEFAULT_MODEL_NAME

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self._model_name,
            "gguf_file": self.gguf_file,
            "dtype": self.dtype,
            **{name: getattr(self, name) for name in CALL_OPTIONS if name != "timeout"},
            "stop": self.stop,
            "json_string_max_chars": self.json_string_max_chars,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=_PROVIDER,
            ls_model_name=kwargs.get("model") or self._model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if ls_stop := stop or self.stop:
            params["ls_stop"] = ls_stop
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` by the model's own tokenizer (loading the model on first use),
        special-token spellings read as `parse_special_tokens` says; LangChain's default is
        GPT-2's, which is another vocabulary and is not available offline."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        # A server's model: the tokenizer the remote engine renders its prompts with.
        tokenizer = self._tokenizer or self._get_engine().tokenizer
        split = not self.parse_special_tokens
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split)

    # -- loading and per-call settings -----------------------------------------------------

    def _limits(self) -> EngineLimits:
        return EngineLimits(
            self.max_concurrent_requests,
            self.max_batch_rows,
            self.kv_budget_bytes,
            self.prefix_cache_bytes,
        )

    def get_engine(self) -> Engine | RemoteEngine:
        """The engine that serves this chat model (the model is loaded on first use): its
        ``stats()`` (requests running and queued, rows per forward, KV and prefix-cache bytes),
        and on a local model ``clear_prefix_cache()``, ``model`` and ``tokenizer``."""
        return self._get_engine()

    def _get_engine(self) -> Engine | RemoteEngine:
        """The engine, loading the model on first use (once, thread-safe)."""
        if self.base_url is not None:  # the model runs on a server: nothing to load
            return self._get_remote()
        if self._engine is None or self._engine.closed:
            # Racing first calls all get the one shared engine: loading holds the registry lock.
            self._engine = self._load_engine()
        return self._engine

    def _get_remote(self) -> RemoteEngine:
        if self._remote is None:
            key = self.api_key.get_secret_value() if self.api_key is not None else None
            self._remote = open_engine(self.model, base_url=self.base_url, api_key=key)
        return self._remote

    def _load_engine(self) -> Engine:
        return open_engine(
            self.model,
            limits=self._limits(),
            gguf_file=self.gguf_file,
            device=self.device,
            dtype=self.dtype,
            device_map=self.device_map,
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
            progress=self.progress,
        )

    def _call_settings(
        self, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[PipelineConfig, float | None, list[dict[str, Any]] | None]:
        """Fields with this call's overrides, as (pipeline config, timeout, tools)."""
        tools = None  # tools reach the template through OutputForm.prepare
        overrides = call_overrides(type(self), kwargs, (None, self.model, self._model_name))
        values = {name: getattr(self, name) for name in CALL_OPTIONS} | overrides
        config = pipeline_config(  # validates steps against max_branches
            values,
            stop=self.stop if stop is None else stop,
            parse_special_tokens=self.parse_special_tokens,
        )
        return config, values["timeout"], tools

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[Request, PipelineConfig]:
        """This call as an engine request (validated before anything loads or runs)."""
        template_messages = convert_messages(messages)
        config, timeout, tools = self._call_settings(stop, kwargs)
        output = self._output(kwargs)

        def prepare(tokenizer: Any) -> tuple[list[dict[str, Any]], Any, PipelineConfig]:
            # Tools and the output form, once the engine knows the model's chat template.
            return output.prepare(tokenizer, template_messages, config)

        request = Request(
            template_messages,
            config,
            tools=tools,
            prepare=prepare,
            timeout=timeout,
            max_retries=self.max_retries,
            num_threads=self.num_threads,
            tokenizer=self._tokenizer,
        )
        return request, config

    # -- the pipeline as a stream of items -------------------------------------------------

    def _iter_items(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Iterator[tuple[str, Any]]:
        """``("event", event)`` per pipeline event, then ``("done", (AnswerResult, config))``."""
        request, config = self._request(messages, stop, kwargs)
        for kind, value in self._get_engine().stream(request):
            yield kind, ((value, config) if kind == "done" else value)

    async def _aiter_items(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> AsyncIterator[tuple[str, Any]]:
        """Async `_iter_items`: the engine feeds an asyncio queue (no thread per call)."""
        request, config = self._request(messages, stop, kwargs)
        engine = self._remote if self.base_url is not None else self._engine
        if engine is None:  # the one-time load must not block the event loop
            engine = await asyncio.to_thread(self._get_engine)
        async for kind, value in engine.astream(request):
            yield kind, ((value, config) if kind == "done" else value)

    # -- BaseChatModel hooks ---------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        output = self._output(kwargs)
        for kind, value in self._iter_items(messages, stop, kwargs):
            if kind == "done":
                return chat_result(*value, self._model_name, output)
        msg = "the pipeline ended without an answer"  # unreachable: _iter_items ends on one
        raise RuntimeError(msg)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        output = self._output(kwargs)
        async for kind, value in self._aiter_items(messages, stop, kwargs):
            if kind == "done":
                return chat_result(*value, self._model_name, output)
        msg = "the pipeline ended without an answer"
        raise RuntimeError(msg)

    # BaseChatModel calls `run_manager.on_llm_new_token` for every chunk `_stream` yields
    # (stream, astream_events and streaming invoke alike); calling it here as well would
    # give callback handlers every token twice.
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        calls = _tools.ToolCallStream() if self._output(kwargs).parses_calls else None
        for kind, value in self._iter_items(messages, stop, kwargs):
            if kind == "done":
                yield final_chunk(*value, self._model_name, calls)
            elif chunk := event_chunk(value, calls):
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        calls = _tools.ToolCallStream() if self._output(kwargs).parses_calls else None
        async for kind, value in self._aiter_items(messages, stop, kwargs):
            if kind == "done":
                yield final_chunk(*value, self._model_name, calls)
            elif chunk := event_chunk(value, calls):
                yield chunk

    # -- tools and structured output -------------------------------------------------------

    def _output(self, kwargs: dict[str, Any]) -> OutputForm:
        return OutputForm.from_kwargs(kwargs, self.json_string_max_chars)

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools to the model; calls come back in `AIMessage.tool_calls`.

        Tools are rendered by the tokenizer's chat template (``tools=``) when it supports
        them, else written into the system prompt in SmolLM2's format. With tools bound the
        answer is decoded sequentially (pass ``mode="parallel"`` to plan anyway), and tool
        calls are parsed from it: unparsable ones land in `invalid_tool_calls`.

        Args:
            tools: LangChain tools, functions, Pydantic classes, TypedDicts or OpenAI tool
                dicts (anything `convert_to_openai_tool` accepts).
            tool_choice: None or "auto" (the model decides), "none" (no calls), "any" /
                "required" / True (force one call of any tool) or a tool name (or
                ``{"type": "function", "function": {"name": ...}}``) to force that tool. A
                forced call is decoded under a grammar, so its arguments are valid JSON for
                the tool's schema even on a very small model.
            **kwargs: Other per-call options to bind (e.g. ``max_tokens``).

        Raises:
            ValueError: ``tool_choice`` names no bound tool, or forces a call of a tool whose
                schema the grammar cannot enforce (e.g. a recursive model).
        """
        formatted, choice = bound_tools(tools, tool_choice)
        if choice is not None:
            kwargs["tool_choice"] = choice
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable that answers with an instance of ``schema``.

        The answer is decoded under a grammar built from the schema (xgrammar), so it is
        always well-formed JSON with the schema's fields and types; a system instruction
        that shows the schema helps a small model choose sensible values.

        Args:
            schema: A Pydantic class (returns instances), a TypedDict or a JSON schema dict
                (returns dicts). May be None with ``method="json_mode"`` (any JSON object).
            method: "json_schema" (default): the whole answer is the JSON. "function_calling":
                a forced call of a tool made from the schema (`bind_tools`). "json_mode":
                JSON output; the schema, when given, is enforced as well.
            include_raw: Return ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}``
                instead of raising on a parsing error (a cut-off object is one, never data).
            strict: Accepted for compatibility; the grammar always enforces the schema.

        Raises:
            ValueError: An unknown method or keyword, no schema where one is needed, or a
                schema the grammar cannot enforce (an unknown type, recursion).
        """
        if kwargs:
            msg = f"unexpected keyword arguments {sorted(kwargs)} for with_structured_output"
            raise ValueError(msg)
        return structured_output(
            self, schema, method=method, include_raw=include_raw, strict=strict
        )
