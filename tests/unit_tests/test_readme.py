"""The README's claims that drift: the install note and the benchmarks section's shape.

The benchmarks section keeps one current table per benchmark, each with the command that
produced it (no reruns, no history); the install note says how to get torch's CPU build.
"""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def _benchmarks() -> list[tuple[str, str]]:
    """(name, text) of each benchmark paragraph group: from one bold ``**Name** (`bench``
    lead to the next."""
    text = _section("Benchmarks")
    leads = list(re.finditer(r"^\*\*([^*]+)\*\* \(`bench", text, re.M))
    ends = [m.start() for m in leads[1:]] + [len(text)]
    return [(m.group(1), text[m.start() : end]) for m, end in zip(leads, ends, strict=True)]


def test_each_benchmark_has_one_table_and_its_command() -> None:
    benchmarks = _benchmarks()
    assert len(benchmarks) >= 5
    for name, text in benchmarks:
        tables = re.findall(r"^\|---", text, re.M)
        assert len(tables) == 1, f"{name}: {len(tables)} tables"
        same_runs = "the same runs and commands as above" in text
        assert same_runs or "```bash\nparallel-reason bench " in text, f"{name}: no command"


def test_the_benchmarks_section_is_no_changelog() -> None:
    text = _section("Benchmarks")
    for stale in (r"\bissue \d+", r"\bRe-run\b", r"\bbefore \(0\.1\.0", r"earlier set"):
        assert not re.search(stale, text), stale


def test_the_install_note_says_how_to_get_the_cpu_build() -> None:
    note = README[: README.index("\n## ")]
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in note
    assert "so pip takes the CPU build" not in note
