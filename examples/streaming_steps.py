"""Watch the parallel steps being written live, side by side, then the merged answer.

Each stream chunk carries either content or live step text in
`chunk.additional_kwargs["parallel_steps"]` (a list of {"step", "title", "text"}).
Run: `python examples/streaming_steps.py` (add `--plan` to let the model decide: in mode "auto"
it first chooses between a plan and a direct answer, and `response_metadata["parallel"]`
gives its `route` and `route_reason`).
"""

from __future__ import annotations

import argparse

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from langchain_parallel_reason import ChatParallelReason

QUESTION = "Compare a bicycle and a car for getting around a city."
STEPS = ["Bicycle", "Car", "Costs"]


def render(titles: dict[int, str], texts: dict[int, str], content: str) -> Group:
    table = Table.grid(expand=True, padding=(0, 1))
    for _ in titles:
        table.add_column(ratio=1)
    if titles:
        table.add_row(
            *(
                Panel(texts.get(i, ""), title=f"step {i + 1}: {titles[i]}", border_style="cyan")
                for i in sorted(titles)
            )
        )
    return Group(table, Panel(content or "...", title="answer", border_style="green"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="let the model plan its own steps")
    args = parser.parse_args()

    console = Console()
    llm = ChatParallelReason(max_tokens=160, step_max_tokens=40, temperature=0.0)
    options = {} if args.plan else {"steps": STEPS}
    console.print(f"[bold]Q:[/bold] {QUESTION}")

    # Given steps get their panels at once; planned ones appear with their first text.
    titles: dict[int, str] = {} if args.plan else dict(enumerate(STEPS))
    texts: dict[int, str] = {}
    content = ""
    last = None
    with Live(render(titles, texts, content), console=console, refresh_per_second=12) as live:
        for chunk in llm.stream(QUESTION, **options):
            for part in chunk.additional_kwargs.get("parallel_steps", []):
                titles[part["step"]] = part["title"]
                texts[part["step"]] = texts.get(part["step"], "") + part["text"]
            content += str(chunk.content)
            last = chunk
            live.update(render(titles, texts, content))

    if last is not None:
        report = last.response_metadata["parallel"]
        console.print(
            f"mode: {report['mode_used']}"
            + (f" (fallback: {report['fallback_reason']})" if report["fallback_reason"] else "")
            + f", branch tokens: {report['branch_tokens']}, step forward passes: "
            f"{report['decode_steps']}, tokens per forward: {report['tokens_per_forward']}"
        )


if __name__ == "__main__":
    main()
