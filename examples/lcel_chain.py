"""An LCEL chain: prompt | ChatParallelReason | StrOutputParser, on the embedded model.

Run: `python examples/lcel_chain.py` (the first run converts the embedded SmolLM2-135M-Instruct
once, about half a minute; later runs start in a second or two).
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_parallel_reason import ChatParallelReason


def main() -> None:
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You are a concise assistant."),
            ("human", "{question}"),
        ]
    )
    # Small budgets keep the example quick on a CPU; `steps=` skips planning and decodes
    # the two steps in parallel. Drop it to let the model plan its own steps.
    llm = ChatParallelReason(max_tokens=96, step_max_tokens=32, temperature=0.0)
    chain = prompt | llm.bind(steps=["Tea", "Coffee"]) | StrOutputParser()

    question = "Compare tea and coffee for a morning drink."
    print(f"Q: {question}\n")
    print(chain.invoke({"question": question}))

    # The same model without the parser returns the message with what the pipeline did.
    message = (prompt | llm.bind(steps=["Tea", "Coffee"])).invoke({"question": question})
    report = message.response_metadata["parallel"]
    print(
        f"\nmode: {report['mode_used']}, steps: {report['steps']}, "
        f"branch tokens: {report['branch_tokens']}, forward passes for the steps: "
        f"{report['decode_steps']}, usage: {message.usage_metadata}"
    )


if __name__ == "__main__":
    main()
