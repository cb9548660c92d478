"""An LCEL chain: prompt | ChatParallelReason | StrOutputParser, on the embedded model.

Run: `python examples/lcel_chain.py` (the first run converts the embedded SmolLM2-135M-Instruct
once, about half a minute; later runs load it in a second or two).
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_parallel_reason import ChatParallelReason

QUESTION = "Compare tea and coffee for a morning drink."


def main() -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a concise assistant."), ("human", "{question}")]
    )
    # Small budgets keep the example quick on a CPU.
    llm = ChatParallelReason(max_tokens=96, step_max_tokens=32, plan_retries=1)

    # 1. The usual chain: in mode "auto" the model first chooses between a plan (its steps
    #    decoded in parallel) and a direct answer; the report's route_reason says which and why.
    chain = prompt | llm | StrOutputParser()
    print(f"Q: {QUESTION}\n")
    print(chain.invoke({"question": QUESTION}))

    # 2. Steps given per call with `.bind`: Stage 1 is skipped and both steps are decoded
    #    in parallel, one token of each per forward pass.
    message = (prompt | llm.bind(steps=["Tea", "Coffee"])).invoke({"question": QUESTION})
    report = message.response_metadata["parallel"]
    print(f"\nWith steps=['Tea', 'Coffee']:\n{message.content}")
    print(
        f"mode: {report['mode_used']}, branch tokens: {report['branch_tokens']}, "
        f"forward passes for the steps: {report['decode_steps']}, usage: {message.usage_metadata}"
    )


if __name__ == "__main__":
    main()
