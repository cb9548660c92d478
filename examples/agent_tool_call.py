"""An agent loop on the embedded model: ChatParallelReason calls a Python tool, reads the result,
answers; then the parallel reasoner itself serves as a tool of another agent.

Run: `python examples/agent_tool_call.py` (needs `pip install langchain-parallel-reason[agents]`;
the first run converts the embedded SmolLM2-135M-Instruct once, about half a minute).

The 135M model rarely decides to call a tool by itself, so a small middleware forces the first
call (`tool_choice="any"`: the call is decoded under a grammar built from the tool's schema,
so its arguments are always valid) and, once a tool result is in, lets the model answer in
text (`tool_choice="none"`). A larger instruct model can run with the defaults.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from langchain_parallel_reason import ChatParallelReason
from langchain_parallel_reason.tools import parallel_reasoner_tool


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@wrap_model_call
def call_a_tool_then_answer(
    request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
) -> ModelResponse:
    """Force one tool call first; after a tool result, the model answers in text."""
    answered = any(isinstance(m, ToolMessage) for m in request.messages)
    return handler(request.override(tool_choice="none" if answered else "any"))


def show(messages: list[BaseMessage]) -> None:
    for message in messages:
        if isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls):
            for call in message.tool_calls:
                print(f"  AI   -> {call['name']}({call['args']})")
            for bad in message.invalid_tool_calls:
                print(f"  AI   -> invalid call {bad['args']!r}: {bad['error']}")
        elif isinstance(message, AIMessage):
            print(f"  AI   : {message.text}")
        elif isinstance(message, ToolMessage):
            print(f"  tool : {message.text}")
        else:
            print(f"  {message.type:5}: {message.text}")


def main() -> None:
    # Short budgets keep the example quick on a CPU: strings in forced JSON stay short, and an
    # answer ends at its first blank line (stop strings do not apply inside a forced call).
    llm = ChatParallelReason(max_tokens=40, json_string_max_chars=60, stop=["\n\n"])

    # 1. An agent that calls `multiply`, gets the ToolMessage back, and answers.
    start = time.perf_counter()
    agent = create_agent(llm, tools=[multiply], middleware=[call_a_tool_then_answer])
    state: dict[str, Any] = agent.invoke(
        {"messages": [HumanMessage("What is 12 times 7? Use the multiply tool.")]},
        {"recursion_limit": 8},
    )
    print("Agent with a Python tool:")
    show(state["messages"])
    call = state["messages"][1].response_metadata["parallel"]["fallback_reason"]
    print(f"  (first call: {call})")

    # 2. The parallel reasoner as a tool of another agent: the outer agent hands the question
    #    over; the tool answers with two steps decoded in parallel, then a conclusion.
    reasoner = parallel_reasoner_tool(
        ChatParallelReason(max_tokens=48, step_max_tokens=16, steps=["Tea", "Coffee"]),
        description="Compares two options step by step. Input: the question.",
    )
    outer = create_agent(llm, tools=[reasoner], middleware=[call_a_tool_then_answer])
    state = outer.invoke(
        {"messages": [HumanMessage("Should I drink tea or coffee in the morning?")]},
        {"recursion_limit": 8},
    )
    print("\nAgent with the parallel reasoner as a tool:")
    show(state["messages"])
    print(f"\nTotal: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
