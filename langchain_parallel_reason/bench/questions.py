"""`parallel-reason bench questions`: does the model plan by itself, and are its answers usable?

Contract: `run_question_bench(model, tokenizer, questions, config)` answers every question with
the model's own plan (no `steps`) through `pipeline.answer` and returns a JSON-able dict: per
question the plan, branch finish reasons and checks, and in total how many plans validated,
looked sensible (`sensible_titles`), had a step still stuck in a loop, or ended without a
conclusion although budget was left. `load_questions()` reads the question set kept in the
package (`questions.txt`, one question a line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from typing import Any

__all__ = [
    "QUESTIONS_FILE",
    "add_arguments",
    "load_questions",
    "run",
    "run_question_bench",
    "sensible_titles",
]

QUESTIONS_FILE = "questions.txt"
"""The question set, next to this module; `#` lines are comments."""


def load_questions(path: str | None = None) -> list[str]:
    """The questions of ``path`` (default: the package's `questions.txt`), one a line."""
    if path is None:
        text = (resources.files(__package__) / QUESTIONS_FILE).read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def sensible_titles(titles: list[str], question: str) -> bool:
    """True when a plan's titles could name parts of ``question``: at least 2, each starting
    with a letter and at most 5 words (a name, not a sentence), none a placeholder, none copied
    from the prompt's example unless the question uses that word, none restating the whole
    question. A heuristic: it cannot tell whether a title fits the question."""
    from langchain_parallel_reason.plan import is_placeholder_title
    from langchain_parallel_reason.prompts import example_titles

    q = question.casefold()
    copied = example_titles()
    return len(titles) >= 2 and not any(
        is_placeholder_title(t)
        or not t[:1].isalpha()
        or len(t.split()) > 5
        or (t.casefold() in copied and t.casefold() not in q)
        or t.casefold().strip(" ?.!") == q.strip(" ?.!")
        for t in titles
    )


def _looping(tokenizer: Any, text: str) -> bool:
    """True when ``text`` still ends in a loop (what the guard should have cut)."""
    from langchain_parallel_reason.decoding.repetition import find_loop

    return find_loop(tokenizer.encode(text, add_special_tokens=False)) is not None


def run_question_bench(
    model: Any, tokenizer: Any, questions: list[str], config: Any, progress: bool = False
) -> dict[str, Any]:
    """Answer each question with its own plan; return per-question rows and totals."""
    from langchain_parallel_reason.pipeline import answer

    rows = []
    for i, question in enumerate(questions):
        t = time.perf_counter()
        result = answer(model, tokenizer, [{"role": "user", "content": question}], config)
        report = result.report
        parallel = report.mode_used == "parallel"
        bodies = _step_bodies(result.content, report.steps) if parallel else []
        budget_left = result.output_tokens < config.max_tokens
        row = {
            "question": question,
            "mode_used": report.mode_used,
            "fallback_reason": report.fallback_reason,
            "plan_attempts": report.plan_attempts,
            "steps": report.steps,
            "branch_finish_reasons": report.branch_finish_reasons,
            "validated": parallel,
            "sensible": parallel and sensible_titles(report.steps, question),
            "loops_cut": report.branch_finish_reasons.count("repetition"),
            "stuck_in_loop": any(_looping(tokenizer, body) for body in bodies),
            "conclusion_tokens": report.conclusion_tokens,
            "empty_conclusion": parallel and budget_left and report.conclusion_tokens == 0,
            "output_tokens": result.output_tokens,
            "seconds": round(time.perf_counter() - t, 2),
            "content": result.content,
        }
        rows.append(row)
        if progress:
            mark = "ok " if row["sensible"] else ("val" if parallel else "---")
            print(f"[{i + 1}/{len(questions)}] {mark} {report.steps} {question}", file=sys.stderr)
    n = len(rows)
    return {
        "questions": n,
        "validated": sum(r["validated"] for r in rows),
        "sensible": sum(r["sensible"] for r in rows),
        "stuck_in_loop": sum(r["stuck_in_loop"] for r in rows),
        "loops_cut": sum(r["loops_cut"] for r in rows),
        "empty_conclusions": sum(r["empty_conclusion"] for r in rows),
        "max_output_tokens": max((r["output_tokens"] for r in rows), default=0),
        "rows": rows,
    }


def _step_bodies(content: str, titles: list[str]) -> list[str]:
    """The text of each step in merged content (``**Title**: text`` blocks)."""
    bodies = []
    for k, title in enumerate(titles):
        head = f"**{title}**: "
        start = content.find(head)
        if start < 0:
            continue
        start += len(head)
        nxt = content.find(f"**{titles[k + 1]}**: ", start) if k + 1 < len(titles) else -1
        bodies.append(content[start : nxt if nxt >= 0 else None].split("\n\n")[0])
    return bodies


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the command's own options (the registry adds --model, --device, --debug)."""
    parser.add_argument("--file", default=None, help="question file (default: the built-in set)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--max-tokens", type=int, default=512, help="per answer (default 512)")
    parser.add_argument("--step-max-tokens", type=int, default=96, help="per step (default 96)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the bench from parsed arguments; print a summary (or JSON); return 0."""
    from langchain_parallel_reason.loading import load_model_and_tokenizer
    from langchain_parallel_reason.pipeline import PipelineConfig
    from langchain_parallel_reason.runtime.threads import apply_threads

    questions = load_questions(args.file)[: args.limit]
    config = PipelineConfig(max_tokens=args.max_tokens, step_max_tokens=args.step_max_tokens)
    apply_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, progress=True)
    result = run_question_bench(model, tokenizer, questions, config, progress=True)  # stderr
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    n = result["questions"]
    print(
        f"{n} questions: own plan validated {result['validated']}/{n}, sensible "
        f"{result['sensible']}/{n}; steps stuck in a loop {result['stuck_in_loop']} "
        f"(loops cut by the guard {result['loops_cut']}); empty conclusions "
        f"{result['empty_conclusions']}; most output tokens {result['max_output_tokens']}"
    )
    return 0
