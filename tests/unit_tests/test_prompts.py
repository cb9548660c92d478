"""Prompt files load as templates, format cleanly and agree with the format markers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from langchain_core.prompts import PromptTemplate

from langchain_parallel_reason import prompts
from langchain_parallel_reason.plan import parse_plan
from langchain_parallel_reason.prompts import (
    END_MARKER,
    PLACEHOLDER,
    PROMPT_NAMES,
    STEP_MARKER,
    conclusion_cue,
    load_prompt,
    stage1_system_prompt,
    step_header,
)


def test_markers() -> None:
    assert (STEP_MARKER, END_MARKER, PLACEHOLDER) == ("####", "####%%%%", "......")
    assert step_header("Taste") == "####Taste:"


@pytest.mark.parametrize("name", PROMPT_NAMES)
def test_every_prompt_loads_as_a_template(name: str) -> None:
    template = load_prompt(name)
    assert isinstance(template, PromptTemplate)
    assert template.template.strip()
    assert not template.template.endswith("\n")  # the file's final newline is dropped


def test_template_variables() -> None:
    assert load_prompt("stage1_plan").input_variables == ["max_branches"]
    assert load_prompt("step").input_variables == ["title"]
    assert load_prompt("conclusion").input_variables == []
    assert load_prompt("route").input_variables == ["question"]
    assert "Taste" in load_prompt("step").format(title="Taste")


def test_unknown_prompt_name() -> None:
    with pytest.raises(ValueError, match="unknown prompt 'nope'"):
        load_prompt("nope")


def test_stage1_prompt_formats_and_shows_the_format() -> None:
    text = stage1_system_prompt(5)
    assert "2 to 5" in text
    assert "{" not in text
    # The example in the prompt is itself a plan that the parser accepts.
    example = text[text.index("Answer:\n") + len("Answer:\n") :]
    plan = parse_plan(example, max_branches=5)
    assert plan.titles == ["Rabbit", "Hamster"]
    # Its titles are words of its question (what a plan's titles should be), and the pipeline
    # knows them, to drop a copy of them from another question's plan.
    question = text[text.index("Question:") : text.index("Answer:")]
    assert all(title.lower() in question.lower() for title in plan.titles)
    assert prompts.example_titles() == {"rabbit", "hamster"}
    # ... and its detailed steps use the same headers Stage 2 forces.
    for title in plan.titles:
        assert f"\n{step_header(title)} " in example
    # The words an answer must not echo (bench questions counts them).
    assert {"rabbit", "hamster"} <= prompts.example_words()


def test_example_words_are_the_content_words_of_a_worked_example() -> None:
    old = (
        "Answer in this fixed format.\n\nExample.\nQuestion: Which is the better pet for a "
        "small flat, a rabbit or a hamster?\n####Rabbit: A rabbit needs room to hop.\n"
        "Conclusion: The hamster is the better pet here."
    )
    words = prompts.example_words(old)
    assert {"rabbit", "hamster", "flat", "small", "room"} <= words
    assert not words & {"conclusion", "question", "answer", "which", "better"}


@pytest.mark.parametrize("bad", [1, 0, -3, True, 2.5, "4"])
def test_stage1_prompt_rejects_bad_max_branches(bad: object) -> None:
    with pytest.raises(ValueError, match="max_branches"):
        stage1_system_prompt(bad)  # type: ignore[arg-type]


def test_conclusion_cue_closes_the_steps() -> None:
    cue = conclusion_cue()
    assert cue.startswith(END_MARKER + "\n")
    assert cue == "####%%%%\nConclusion:"
    # The Stage-1 example ends with exactly this cue, so the model has seen it.
    assert cue in stage1_system_prompt(3)


def test_checkout_folder_is_found() -> None:
    # Tests run from a checkout: the texts come from the top-level prompts/ folder.
    folder = prompts._checkout_dir()
    assert folder is not None
    assert (folder / "stage1_plan.txt").is_file()


def test_installed_layout_reads_package_data(tmp_path: Path) -> None:
    # Mimic the wheel: the texts sit in langchain_parallel_reason/_prompts, and there is no
    # checkout (no pyproject.toml, no prompts/) around the package.
    package = tmp_path / "langchain_parallel_reason"
    (package / "_prompts").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(prompts.__file__, package / "prompts.py")
    (package / "_prompts" / "conclusion.txt").write_text("INSTALLED CUE\n", encoding="utf-8")
    code = "from langchain_parallel_reason.prompts import conclusion_cue; print(conclusion_cue())"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "INSTALLED CUE\n"
