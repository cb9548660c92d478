"""Prompt texts and format markers of the three-stage parallel reasoning format.

Contract: the texts live in the top-level ``prompts/`` folder (a checkout) or in the wheel's
``langchain_parallel_reason/_prompts`` (an install); ``load_prompt`` returns them as LangChain
``PromptTemplate``s, and the marker constants below are the only spelling of the format.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

from langchain_core.prompts import PromptTemplate

__all__ = [
    "END_MARKER",
    "PLACEHOLDER",
    "PROMPT_NAMES",
    "STEP_MARKER",
    "conclusion_cue",
    "echo_words",
    "example_titles",
    "example_words",
    "load_prompt",
    "route_question",
    "stage1_system_prompt",
    "step_header",
]

STEP_MARKER = "####"
"""Starts every step line: a title in the Stage-1 plan, a branch in Stage 2."""

END_MARKER = "####%%%%"
"""Closes the Stage-1 title list (and, in the merged text, the detailed steps)."""

PLACEHOLDER = "......"
"""Written after each title's colon in the Stage-1 plan instead of the step itself."""

PROMPT_NAMES: tuple[str, ...] = ("stage1_plan", "step", "conclusion", "route")
"""Names accepted by `load_prompt`, one per ``prompts/<name>.txt`` file."""

_PACKAGE = "langchain_parallel_reason"
_INSTALLED_DIR = "_prompts"  # where hatch force-include puts prompts/ inside the wheel


def _checkout_dir() -> Path | None:
    """Return the repository's ``prompts/`` folder when running from a checkout, else None."""
    root = Path(__file__).resolve().parent.parent
    # pyproject.toml next to it proves this is our checkout and not a stray `prompts`
    # folder that some other distribution dropped into site-packages.
    if (root / "pyproject.toml").is_file() and (root / "prompts").is_dir():
        return root / "prompts"
    return None


@functools.cache
def _read_text(name: str) -> str:
    """Read ``<name>.txt`` from the installed package data, else from the checkout."""
    filename = f"{name}.txt"
    try:
        # An installed wheel carries the texts as package data. In a checkout (or an
        # editable install) there is no `_prompts` folder and we fall through.
        resource = resources.files(_PACKAGE) / _INSTALLED_DIR / filename
        if resource.is_file():
            return _strip_final_newline(resource.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, TypeError, NotADirectoryError, FileNotFoundError):
        # files() refuses some namespace-package and zip layouts; the checkout may still work.
        pass
    folder = _checkout_dir()
    if folder is not None and (folder / filename).is_file():
        return _strip_final_newline((folder / filename).read_text(encoding="utf-8"))
    msg = (
        f"prompt file {filename!r} not found in the installed package ({_PACKAGE}/"
        f"{_INSTALLED_DIR}) nor in a checkout's prompts/ folder; reinstall the package"
    )
    raise FileNotFoundError(msg)


def _strip_final_newline(text: str) -> str:
    """Drop the one newline that ends a text file, so a cue such as `conclusion` is exact."""
    return text.removesuffix("\n")


def load_prompt(name: str) -> PromptTemplate:
    """Return the prompt ``prompts/<name>.txt`` as an f-string ``PromptTemplate``.

    Names: ``"stage1_plan"`` (system prompt, variable ``max_branches``), ``"step"`` (a branch
    instruction, variable ``title``), ``"conclusion"`` (the Stage-3 cue, no variables) and
    ``"route"`` (the router's yes/no question, variable ``question``).
    The file's final newline is not part of the template. Each call returns a new template;
    the file itself is read once per process.

    Raises:
        ValueError: If ``name`` is not one of `PROMPT_NAMES`.
        FileNotFoundError: If the package was installed without its prompt files.
    """
    if name not in PROMPT_NAMES:
        msg = f"unknown prompt {name!r}; choose one of {', '.join(PROMPT_NAMES)}"
        raise ValueError(msg)
    return PromptTemplate.from_template(_read_text(name), template_format="f-string")


def stage1_system_prompt(max_branches: int) -> str:
    """Return the Stage-1 system prompt asking for 2..``max_branches`` step titles.

    Raises:
        ValueError: If ``max_branches`` is not an integer of at least 2.
    """
    # bool is an int subclass; True would render as "True" in the prompt.
    if isinstance(max_branches, bool) or not isinstance(max_branches, int) or max_branches < 2:
        msg = f"max_branches must be an integer >= 2, got {max_branches!r}"
        raise ValueError(msg)
    return load_prompt("stage1_plan").format(max_branches=max_branches)


def route_question(question: str) -> str:
    """Return the router's question about ``question``: should its answer be split into
    independent parts? The model answers yes (plan) or no (direct answer)."""
    return load_prompt("route").format(question=question)


def example_titles() -> frozenset[str]:
    """The step titles of the Stage-1 prompt's own example, casefolded.

    A small model tends to copy them whatever the question; the pipeline drops a copied title
    unless the question itself uses it. (A prompt showing only the answer's shape, with
    placeholder titles, was tried: the 135M model then wrote "<first part>" as a title and
    fewer plans validated, so the shipped prompt keeps its worked example.)
    """
    text = _read_text("stage1_plan")
    return frozenset(
        line[len(STEP_MARKER) :].split(":")[0].strip().casefold()
        for line in text.splitlines()
        if line.startswith(STEP_MARKER) and not line.startswith(END_MARKER)
    )


# Words of an example that say nothing about its topic: an answer may use them freely.
_FORMAT_WORDS = frozenset(
    (
        "title",
        "titles",
        "conclusion",
        "question",
        "answer",
        "part",
        "parts",
        "step",
        "steps",
        "detail",
        "line",
        "example",
        "shape",
        "format",
        "words",
    )
)


def example_words(prompt: str | None = None) -> frozenset[str]:
    """Content words of the Stage-1 prompt's example (casefolded, 4 letters or more, no
    ``<placeholder>`` and no format word): what an answer must not repeat unless its question
    uses it (``bench questions`` counts answers that echo two or more of them).
    ``prompt``: another Stage-1 prompt's text to read instead (to compare prompts)."""
    text = _read_text("stage1_plan") if prompt is None else prompt
    start = max(text.find("\nExample."), text.find("\nThe shape"))
    # The example's body: after its header line ("Example." or "The shape, ...").
    body = text[text.find("\n", start + 1) :] if start >= 0 else ""
    body = re.sub(r"<[^>\n]*>", " ", body)
    words = {w.casefold() for w in re.findall(r"[A-Za-z]{4,}", body)}
    return frozenset(words - _FORMAT_WORDS - _STOP_WORDS)


def echo_words(*texts: str) -> tuple[str, ...]:
    """The words the steps and the conclusion may not write: each content word of the Stage-1
    prompt's example (`example_words`) that none of ``texts`` (the caller's messages, given
    step titles) uses, folded for case and plural, in its singular and plural forms, lower-case
    and capitalised ("rabbit", "rabbits", "Rabbit", "Rabbits").

    The example is shown to teach the plan's format, and a 135M model copies its content into
    unrelated answers ("Item 1: A rabbit needs room to hop"); the pipeline bans these words in
    Stage 2 and 3 (``RepetitionControl.banning``, vLLM's ``bad_words`` on a server). The
    example is written with topic words only, so the ban takes no common word from an answer.
    """
    from .titles import fold  # imported here: this module must load alone (test_prompts)

    used = {fold(w) for text in texts for w in re.findall(r"[^\W_]+", text)}
    out: list[str] = []
    for word in sorted(example_words()):
        base = fold(word)
        if base in used:
            continue
        plural = base + ("es" if base.endswith(("s", "x", "z", "ch", "sh")) else "s")
        for form in (base, plural):
            out += [form, form.capitalize()]
    return tuple(out)


_STOP_WORDS = frozenset(
    (
        "that",
        "this",
        "with",
        "from",
        "have",
        "into",
        "than",
        "then",
        "they",
        "them",
        "their",
        "there",
        "here",
        "what",
        "when",
        "which",
        "while",
        "will",
        "would",
        "could",
        "should",
        "about",
        "after",
        "before",
        "because",
        "being",
        "every",
        "some",
        "more",
        "most",
        "much",
        "many",
        "very",
        "only",
        "also",
        "just",
        "like",
        "your",
        "each",
        "other",
        "same",
        "since",
        "look",
        "needs",
        "better",
    )
)


def conclusion_cue() -> str:
    """Return the text forced after the merged steps to start Stage 3 (``"####%%%%\\nConclusion:"``).

    It repeats `END_MARKER` on its own line, as the Stage-1 example does after the detailed
    steps, so the caller must make sure the merged steps end with a newline before it. The
    model then continues the answer after ``Conclusion:``.
    """
    return load_prompt("conclusion").format()


def step_header(title: str) -> str:
    """Return the forced prefix of one Stage-2 branch: ``####<title>:``."""
    return f"{STEP_MARKER}{title}:"
