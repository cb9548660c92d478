"""`parallel-reason bench questions`: does the model route, plan by itself, and answer usably?

Contract: `run_question_bench(model, tokenizer, questions, config)` answers every question with
the model's own route and plan (no `steps`) through `pipeline.answer` and returns a JSON-able
dict: per question its label, route, plan, branch finish reasons and checks, and in total how
many were routed as labelled (`route`), how many plans validated, looked sensible
(`sensible_titles`), had a step still stuck in a loop, or ended without a conclusion although
budget was left; plans of questions that list their parts whose titles are the question's
own words (`titles_from_question`), answers that echo the prompt's example
(`echoed_words`) and plans with a conclusion. `run_route_bench` only asks the router (one forward a question).
`load_questions()` / `load_labeled_questions()` read the question set kept in the package
(`questions.txt`, one ``label: question`` a line).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from importlib import resources
from typing import Any

__all__ = [
    "LABELS",
    "QUESTIONS_FILE",
    "add_arguments",
    "echoed_words",
    "load_labeled_questions",
    "load_questions",
    "route_totals",
    "run",
    "run_question_bench",
    "run_route_bench",
    "sensible_titles",
    "titles_from_question",
]

QUESTIONS_FILE = "questions.txt"
"""The question set, next to this module; `#` lines are comments."""

LABELS = ("plan", "direct")
"""Question labels: the route a sensible router takes (independent parts, or one answer)."""


def load_labeled_questions(path: str | None = None) -> list[tuple[str, str]]:
    """(label, question) pairs of ``path`` (default: the package's `questions.txt`): one
    ``plan: question`` or ``direct: question`` a line; a line without a label is "plan"."""
    if path is None:
        text = (resources.files(__package__) / QUESTIONS_FILE).read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label, colon, rest = line.partition(":")
        if colon and label in LABELS:
            pairs.append((label, rest.strip()))
        else:
            pairs.append(("plan", line))
    return pairs


def load_questions(path: str | None = None, label: str = "plan") -> list[str]:
    """The questions of ``path`` (default: the package's set) labelled ``label``."""
    return [q for lab, q in load_labeled_questions(path) if lab == label]


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


def titles_from_question(titles: list[str], question: str) -> bool:
    """True when every title of a plan (2 or more) is a span of ``question``, compared with
    case and plural folded (`titles.fold`): "Buses" is taken from "a bus or a train"."""
    from langchain_parallel_reason.titles import fold

    words = re.findall(r"[^\W_]+(?:['\u2019-][^\W_]+)*", question)
    folded = f" {fold(' '.join(words))} "
    return len(titles) >= 2 and all(f" {fold(t)} " in folded for t in titles)


def echoed_words(content: str, question: str, words: frozenset[str] | None = None) -> list[str]:
    """The content words of the Stage-1 prompt's example (`prompts.example_words`, or
    ``words``) that ``content`` uses and ``question`` does not; 2 or more is an echo."""
    from langchain_parallel_reason.prompts import example_words

    words = example_words() if words is None else words
    said = {w.casefold() for w in re.findall(r"[A-Za-z]+", content)}
    asked = {w.casefold() for w in re.findall(r"[A-Za-z]+", question)}
    return sorted((said & words) - asked)


def _looping(tokenizer: Any, text: str) -> bool:
    """True when ``text`` still ends in a loop (what the guard should have cut)."""
    from langchain_parallel_reason.decoding.repetition import find_loop

    return find_loop(tokenizer.encode(text, add_special_tokens=False)) is not None


def _labeled(questions: list[str] | list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [("plan", q) if isinstance(q, str) else q for q in questions]


def route_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per label, questions and how many were routed that way; ``rate``: the share routed as
    labelled over all questions."""
    totals: dict[str, Any] = {}
    for label in LABELS:
        mine = [r for r in rows if r["label"] == label]
        totals[label] = {"questions": len(mine), "routed": sum(r["route"] == label for r in mine)}
    routed = sum(t["routed"] for t in totals.values())
    totals["rate"] = round(routed / len(rows), 3) if rows else None
    return totals


def run_route_bench(
    model: Any, tokenizer: Any, questions: list[tuple[str, str]], config: Any
) -> dict[str, Any]:
    """Only the router's choice (`pipeline.choose_route`) for each labelled question."""
    from langchain_parallel_reason.pipeline import choose_route

    rows = []
    for label, question in _labeled(questions):
        messages = [{"role": "user", "content": question}]
        route, reason = choose_route(model, tokenizer, messages, config)
        rows.append({"label": label, "question": question, "route": route, "reason": reason})
    return {"questions": len(rows), "route": route_totals(rows), "rows": rows}


def run_question_bench(
    model: Any,
    tokenizer: Any,
    questions: list[str] | list[tuple[str, str]],
    config: Any,
    progress: bool = False,
) -> dict[str, Any]:
    """Answer each question (a plain string is labelled "plan") with its own route and plan;
    return per-question rows and totals. Plan checks count answers with a plan."""
    from langchain_parallel_reason.runtime import open_engine
    from langchain_parallel_reason.runtime.base import Request
    from langchain_parallel_reason.titles import MIN_CANDIDATES, title_candidates

    engine = open_engine(loaded=(model, tokenizer))  # the door ChatParallelReason uses
    rows = []
    questions = _labeled(questions)
    for i, (label, question) in enumerate(questions):
        t = time.perf_counter()
        *_, (_, result) = engine.stream(Request([{"role": "user", "content": question}], config))
        report = result.report
        parallel = report.mode_used == "parallel"
        bodies = _step_bodies(result.content, report.steps) if parallel else []
        budget_left = result.output_tokens < config.max_tokens
        row = {
            "label": label,
            "question": question,
            "route": report.route,
            "route_reason": report.route_reason,
            "mode_used": report.mode_used,
            "fallback_reason": report.fallback_reason,
            "plan_attempts": report.plan_attempts,
            "steps": report.steps,
            "branch_finish_reasons": report.branch_finish_reasons,
            "validated": parallel,
            "sensible": parallel and sensible_titles(report.steps, question),
            "enumerates": len(title_candidates(question)) >= MIN_CANDIDATES,
            "titles": report.titles,
            "titles_from_question": parallel and titles_from_question(report.steps, question),
            "echo": echoed_words(result.content, question),
            "loops_cut": report.branch_finish_reasons.count("repetition"),
            "stuck_in_loop": any(_looping(tokenizer, body) for body in bodies),
            "conclusion_tokens": report.conclusion_tokens,
            "empty_conclusion": parallel and budget_left and report.conclusion_tokens == 0,
            "blocks": [block.steps for block in report.blocks],
            "output_tokens": result.output_tokens,
            "seconds": round(time.perf_counter() - t, 2),
            "content": result.content,
        }
        rows.append(row)
        if progress:
            mark = "ok " if row["sensible"] else ("val" if parallel else "---")
            print(
                f"[{i + 1}/{len(questions)}] {label}->{report.route} {mark} {report.steps} "
                f"{question}",
                file=sys.stderr,
            )
    n = len(rows)
    listing = [r for r in rows if r["enumerates"] and r["validated"]]
    return {
        "enumerating_plans": len(listing),
        "titles_from_question": sum(r["titles_from_question"] for r in listing),
        "echoes": sum(len(r["echo"]) >= 2 for r in rows),
        "conclusions": sum(r["validated"] and r["conclusion_tokens"] > 0 for r in rows),
        "questions": n,
        "route": route_totals(rows),
        "planned": sum(r["route"] == "plan" for r in rows),
        "later_blocks": sum(max(0, len(r["blocks"]) - 1) for r in rows),
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
    from langchain_parallel_reason.cli_options import add_threads_option

    parser.add_argument("--file", default=None, help="question file (default: the built-in set)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--max-tokens", type=int, default=512, help="per answer (default 512)")
    parser.add_argument("--step-max-tokens", type=int, default=96, help="per step (default 96)")
    add_threads_option(parser)
    parser.add_argument(
        "--label", choices=(*LABELS, "all"), default="all", help="questions of this label"
    )
    parser.add_argument(
        "--mode", choices=("auto", "parallel"), default="auto", help="parallel forces a plan"
    )
    parser.add_argument("--max-blocks", type=int, default=1, help="parallel blocks (default 1)")
    parser.add_argument(
        "--route-only", action="store_true", help="only ask the router (one forward a question)"
    )
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the bench from parsed arguments; print a summary (or JSON); return 0."""
    from langchain_parallel_reason.call_settings import pipeline_config
    from langchain_parallel_reason.loading import load_model_and_tokenizer
    from langchain_parallel_reason.runtime.threads import apply_threads

    questions = [
        (label, q) for label, q in load_labeled_questions(args.file) if args.label in ("all", label)
    ][: args.limit]
    config = pipeline_config(
        {
            "mode": args.mode,
            "max_tokens": args.max_tokens,
            "step_max_tokens": args.step_max_tokens,
            "max_blocks": args.max_blocks,
        }
    )
    apply_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, progress=True)
    if args.route_only:
        result = run_route_bench(model, tokenizer, questions, config)
    else:
        result = run_question_bench(model, tokenizer, questions, config, progress=True)  # stderr
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    n = result["questions"]
    route = result["route"]
    print(
        f"{n} questions: routed as labelled {round(route['rate'] * n)}/{n} (plan "
        f"{route['plan']['routed']}/{route['plan']['questions']}, direct "
        f"{route['direct']['routed']}/{route['direct']['questions']})"
    )
    if args.route_only:
        return 0
    print(
        f"titles from the question in {result['titles_from_question']}/"
        f"{result['enumerating_plans']} plans of questions that list their parts; example "
        f"echoes {result['echoes']}; conclusions {result['conclusions']}/{result['validated']} "
        "plans"
    )
    print(
        f"planned {result['planned']}/{n}: own plan validated {result['validated']}, sensible "
        f"{result['sensible']}/{n}; steps stuck in a loop {result['stuck_in_loop']} "
        f"(loops cut by the guard {result['loops_cut']}); empty conclusions "
        f"{result['empty_conclusions']}; most output tokens {result['max_output_tokens']}; "
        f"later blocks {result['later_blocks']}"
    )
    return 0
