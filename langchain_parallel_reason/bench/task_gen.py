"""Seeded synthetic tasks for `parallel-reason bench tasks`, and their deterministic scorers.

Contract: `generate_tasks(kind, items, samples, seed)` returns the same `Task`s for the same
arguments on any machine (string-seeded `random.Random`, no hash randomisation involved);
`score_answer(task, final, content)` is a pure function of the texts. Pure Python, no torch.

  retrieval  `items` student records (name, GPA, major) and a question whose answer is exactly
             one record (highest GPA, lowest GPA, or the GPA equal to a value), as in the
             paper's student-resume task. One step per record.
  multidoc   `items` short documents, each naming who designed a landmark; the question asks
             about one landmark, so one document holds the answer. One step per document.
  planning   a topic to analyse from `items` named aspects; the model plans its own steps.

Scoring: retrieval and multidoc look at the final answer only (the conclusion, or the text after
the last "Answer:"): right when it names the expected person and no other candidate. A person
counts as named by full name, first name or last name (all distinct within a task). Planning is
right when the whole answer mentions every aspect name (case-insensitive).

Plan score (`score_plan`, for answers whose model wrote its own step titles): the fraction of the
task's N items that some title names, whole words, case-insensitive. An item is a record's
student (full, first or last name), a document (its designer, or "Document i" / "Doc i") or an
aspect (its name). Extra titles cost nothing; missing items do: 1.0 means one title per item.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "TASK_KINDS",
    "Task",
    "final_segment",
    "generate_task",
    "generate_tasks",
    "max_items",
    "mentioned",
    "score_answer",
    "score_plan",
]

TaskKind = Literal["retrieval", "planning", "multidoc"]
TASK_KINDS: tuple[str, ...] = ("retrieval", "planning", "multidoc")
"""Task kinds `generate_task` knows."""

_FIRST_NAMES = (
    "Alice", "Bruno", "Carmen", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid", "Jonas",
    "Keiko", "Liam", "Marta", "Nikhil", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tanya",
    "Ulrich", "Vera", "Walter", "Ximena", "Yusuf", "Zara", "Amir", "Beatriz", "Caleb", "Daria",
    "Emil", "Fiona", "Gideon", "Hana", "Ivan", "Julia", "Kofi", "Leona", "Mateo", "Nadia",
    "Oscar", "Priya", "Rafael", "Sofia", "Tobias", "Uma", "Viktor", "Wendy",
)  # fmt: skip
_LAST_NAMES = (
    "Moreno", "Lindqvist", "Okafor", "Petrov", "Haddad", "Kowalski", "Tanaka", "Ferreira",
    "Novak", "Schmidt", "Duarte", "Brennan", "Castillo", "Yilmaz", "Andersen", "Rossi",
    "Mbeki", "Fischer", "Delgado", "Ivanova", "Nakamura", "Ortega", "Larsen", "Bianchi",
    "Horvath", "Sandoval", "Kaur", "Weber", "Lopez", "Dubois", "Jensen", "Romano",
    "Varga", "Quispe", "Adeyemi", "Holm", "Marino", "Sato", "Becker", "Navarro",
    "Popescu", "Ueda", "Keller", "Vidal", "Lund", "Greco", "Bauer", "Costa",
)  # fmt: skip
_MAJORS = (
    "Biology", "History", "Physics", "Economics", "Music", "Chemistry", "Philosophy",
    "Mathematics", "Art", "Geology", "Linguistics", "Psychology",
)  # fmt: skip
_LANDMARK_WORDS = (
    "Silver", "Northgate", "Harbor", "Crescent", "Amber", "Willow", "Granite", "Falcon",
    "Meadow", "Copper", "Lantern", "Cedar", "Beacon", "Orchid", "Summit", "Riverside",
)  # fmt: skip
_LANDMARK_KINDS = ("Bridge", "Library", "Tower", "Museum", "Theatre", "Station")
_CITIES = (
    "Valmora", "Kestrel Bay", "Dunhollow", "Arlen", "Port Evren", "Mirefield", "Solbrook",
    "Trelawn", "Ostria", "Brackenridge",
)  # fmt: skip
_FEATURES = (
    "its glass roof", "its spiral staircase", "its red brick walls", "its tall clock",
    "its quiet garden", "its wooden doors", "its night lights", "its copper dome",
)  # fmt: skip
_TOPICS = (
    "opening a small bakery in a busy town",
    "moving to a new city for work",
    "starting a community garden",
    "organising a school science fair",
    "buying an electric car",
    "running a weekend music festival",
    "building a public library in a village",
    "launching a bicycle rental shop",
)
_ASPECTS = (
    "Cost", "Time", "Risk", "Location", "Staff", "Quality", "Safety", "Health", "Environment",
    "Law", "Marketing", "Competition", "Transport", "Weather", "Food", "Comfort", "Technology",
    "Maintenance", "Training", "Funding", "Customers", "Suppliers", "Energy", "Noise", "Space",
    "Schedule", "Community", "Culture", "Language", "Education", "Security", "Insurance",
)  # fmt: skip


@dataclass(frozen=True)
class Task:
    """One generated task.

    Attributes:
        kind: "retrieval", "planning" or "multidoc".
        items: records, documents or aspects in the task.
        prompt: the user message.
        steps: one step title per record/document (map-style parallel use); None for planning.
        expected: the person the answer must name (retrieval, multidoc); "" for planning.
        candidates: every person a wrong answer could name, `expected` included.
        aspects: the aspect names a planning answer must mention; () otherwise.
    """

    kind: str
    items: int
    prompt: str
    steps: tuple[str, ...] | None
    expected: str = ""
    candidates: tuple[str, ...] = ()
    aspects: tuple[str, ...] = ()


def max_items(kind: str) -> int:
    """Most items a task of `kind` can hold (the generators' name pools are finite)."""
    if kind == "planning":
        return len(_ASPECTS)
    if kind == "retrieval":
        return min(len(_FIRST_NAMES), len(_LAST_NAMES), 201)  # 201 distinct GPAs 2.00..4.00
    if kind == "multidoc":
        return min(len(_FIRST_NAMES), len(_LAST_NAMES), len(_LANDMARK_WORDS) * len(_LANDMARK_KINDS))
    msg = f"unknown task kind {kind!r}; choose one of {', '.join(TASK_KINDS)}"
    raise ValueError(msg)


def _people(rng: random.Random, n: int) -> list[str]:
    # Distinct first and distinct last names, so each alone identifies one person.
    firsts, lasts = rng.sample(_FIRST_NAMES, n), rng.sample(_LAST_NAMES, n)
    return [f"{a} {b}" for a, b in zip(firsts, lasts, strict=True)]


def _retrieval(rng: random.Random, n: int) -> Task:
    names = _people(rng, n)
    gpas = [g / 100 for g in rng.sample(range(200, 401), n)]
    majors = [rng.choice(_MAJORS) for _ in range(n)]
    records = "\n".join(
        f"{i}. Name: {name}; GPA: {gpa:.2f}; Major: {major}"
        for i, (name, gpa, major) in enumerate(zip(names, gpas, majors, strict=True), start=1)
    )
    question = rng.choice(("highest", "lowest", "equal"))
    if question == "highest":
        target = max(range(n), key=gpas.__getitem__)
        ask = "Which student has the highest GPA?"
    elif question == "lowest":
        target = min(range(n), key=gpas.__getitem__)
        ask = "Which student has the lowest GPA?"
    else:
        target = rng.randrange(n)
        ask = f"Which student has a GPA of exactly {gpas[target]:.2f}?"
    prompt = (
        f"Here are the records of {n} students.\n{records}\n\n"
        f"Question: {ask} Answer with the student's full name."
    )
    return Task("retrieval", n, prompt, tuple(names), names[target], tuple(names))


def _multidoc(rng: random.Random, n: int) -> Task:
    designers = _people(rng, n)
    pairs = rng.sample([(w, k) for w in _LANDMARK_WORDS for k in _LANDMARK_KINDS], n)
    landmarks = [f"{w} {k}" for w, k in pairs]
    docs = []
    for i, (landmark, person) in enumerate(zip(landmarks, designers, strict=True), start=1):
        city, year, feature = rng.choice(_CITIES), rng.randrange(1850, 2001), rng.choice(_FEATURES)
        docs.append(
            f"Document {i}: The {landmark} in {city} was designed by {person} and opened in "
            f"{year}. Visitors know it for {feature}."
        )
    target = rng.randrange(n)
    prompt = (
        f"Read these {n} documents.\n" + "\n".join(docs) + "\n\n"
        f"Question: Who designed the {landmarks[target]}? Answer with the person's full name."
    )
    steps = tuple(f"Document {i}" for i in range(1, n + 1))
    return Task("multidoc", n, prompt, steps, designers[target], tuple(designers))


def _planning(rng: random.Random, n: int) -> Task:
    topic = rng.choice(_TOPICS)
    aspects = tuple(rng.sample(_ASPECTS, n))
    prompt = (
        f"Analyse {topic}. Look at it from each of these {n} aspects: {', '.join(aspects)}. "
        "Write a short paragraph for each aspect, then a conclusion."
    )
    return Task("planning", n, prompt, None, aspects=aspects)


_GENERATORS = {"retrieval": _retrieval, "multidoc": _multidoc, "planning": _planning}


def generate_task(kind: str, items: int, *, seed: int = 0, index: int = 0) -> Task:
    """Task number `index` of `kind` with `items` records/documents/aspects for `seed`.

    Raises:
        ValueError: unknown `kind`, or `items` outside 2..`max_items(kind)`.
    """
    top = max_items(kind)  # also rejects an unknown kind
    if isinstance(items, bool) or not isinstance(items, int) or not 2 <= items <= top:
        msg = f"{kind} tasks take 2 to {top} items, got {items!r}"
        raise ValueError(msg)
    # A string seed is hashed with SHA-512 by random.seed: stable across runs and machines.
    rng = random.Random(f"{kind}:{items}:{seed}:{index}")
    return _GENERATORS[kind](rng, items)


def generate_tasks(kind: str, items: int, samples: int, *, seed: int = 0) -> list[Task]:
    """`samples` tasks (indices 0..samples-1) of `kind` with `items` items each."""
    return [generate_task(kind, items, seed=seed, index=i) for i in range(samples)]


# ----------------------------------------------------------------------------- scoring

_ANSWER_RE = re.compile(r"\banswer\s*:", re.IGNORECASE)


def final_segment(text: str) -> str:
    """The text after the last "Answer:" (any case), or all of `text` when there is none."""
    hits = list(_ANSWER_RE.finditer(text))
    return text[hits[-1].end() :] if hits else text


def _word_in(word: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def mentioned(person: str, text: str) -> bool:
    """Whether `text` names `person` by full name, first name or last name (whole words)."""
    return any(_word_in(alias, text) for alias in (person, *person.split()))


def score_answer(task: Task, final: str, content: str) -> bool:
    """Whether an answer is right (see the module docstring).

    Args:
        task: the task answered.
        final: the final answer: the conclusion of a stepped answer, or a plain answer whole.
        content: the whole answer text (steps included), used for planning.
    """
    if task.kind == "planning":
        return all(_word_in(aspect, content) for aspect in task.aspects)
    segment = final_segment(final)
    named = [c for c in task.candidates if mentioned(c, segment)]
    return named == [task.expected]


def score_plan(task: Task, titles: list[str] | tuple[str, ...]) -> float:
    """Fraction of the task's items that some step title names (see the module docstring)."""
    text = "\n".join(titles)
    if task.kind == "planning":
        named = [_word_in(aspect, text) for aspect in task.aspects]
    elif task.kind == "multidoc":
        named = [
            mentioned(person, text)
            or re.search(rf"\bdoc(ument)?\s*#?{i}(?!\d)", text, re.IGNORECASE) is not None
            for i, person in enumerate(task.candidates, start=1)
        ]
    else:
        named = [mentioned(person, text) for person in task.candidates]
    return sum(named) / len(named) if named else 0.0
