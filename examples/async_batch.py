"""Async use: `abatch` and `asyncio.gather` over one model, without blocking the event loop.

Calls on one model share its engine, which decodes them together (continuous batching: one
forward pass serves every running call); each answer is the one the call gives alone with the
same seed, and the event loop stays free meanwhile.
Run: `python examples/async_batch.py`.
"""

from __future__ import annotations

import asyncio
import time

from langchain_parallel_reason import ChatParallelReason

QUESTIONS = [
    "Name two uses of a paperclip.",
    "Compare cats and dogs as pets.",
    "What should I pack for a beach day?",
]


async def heartbeat(stop: asyncio.Event) -> int:
    """Count ticks while the model works: a blocked event loop would count none."""
    ticks = 0
    while not stop.is_set():
        await asyncio.sleep(0.05)
        ticks += 1
    return ticks


async def main() -> None:
    # Sequential mode keeps this example quick: it is about async, not about planning.
    llm = ChatParallelReason(max_tokens=40, temperature=0.7, seed=42, mode="sequential")
    await llm.ainvoke("Hi")  # load the model once before timing

    stop = asyncio.Event()
    beat = asyncio.create_task(heartbeat(stop))
    t0 = time.perf_counter()
    batch = await llm.abatch(QUESTIONS)
    gathered = await asyncio.gather(*(llm.ainvoke(q) for q in QUESTIONS))
    elapsed = time.perf_counter() - t0
    stop.set()
    ticks = await beat

    for question, message in zip(QUESTIONS, batch, strict=True):
        print(f"Q: {question}\nA: {message.content}\n")
    same = [m.content for m in batch] == [m.content for m in gathered]
    print(f"abatch == gather (same seed): {same}")
    print(f"{2 * len(QUESTIONS)} calls in {elapsed:.1f} s; event-loop ticks meanwhile: {ticks}")

    # Cancelling a task stops its decoding at the next forward pass and frees its place.
    task = asyncio.create_task(llm.ainvoke("Write a long story about a lighthouse."))
    await asyncio.sleep(0.5)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        print("cancelled the long call; the model is free again:")
    print((await llm.ainvoke("Say hello.", max_tokens=16)).content)


if __name__ == "__main__":
    asyncio.run(main())
