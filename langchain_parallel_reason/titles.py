"""Step titles taken from the user's own words: the items a question enumerates, and its
content phrases (word n-grams of up to 4 words).

Contract: pure functions over a string (no model, no LangChain). ``enumerated_items`` finds
the parts a question lists ("trains, buses and bicycles"); ``phrase_candidates`` gives its
content n-grams; ``title_candidates`` is what the Stage-1 grammar offers as titles. Every
candidate is a span of the question (its words as written, first letter capitalised),
distinct from the others once folded for case and plural (`fold`).
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_TITLE_WORDS",
    "MIN_CANDIDATES",
    "enumerated_items",
    "fold",
    "lists_parallel_items",
    "phrase_candidates",
    "title_candidates",
]

MAX_TITLE_WORDS = 4
"""Longest candidate, in words: a name for a part, not a sentence."""

MIN_CANDIDATES = 2
"""Fewest candidates for which the plan's titles are taken from the question (a plan has at
least 2 steps); with fewer, titles are free."""


def _wordset(text: str) -> frozenset[str]:
    """The words of ``text`` (a word list written as a paragraph)."""
    return frozenset(text.split())


# A word: letters or digits, with inner apostrophes or hyphens ("don't", "e-mail").
_WORD_RE = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*")
# What ends a list item besides punctuation: a word that starts a new phrase. Prepositions
# and verbs of the question's frame ("Compare X and Y as pets", "saving money on X, Y and Z").
_FRAME = _wordset(
    """about above across after against along among around as at before behind below beside
    between beyond by compared despite during except for from in inside into like near of off
    on onto out outside over per since than through to toward towards under until up upon
    versus via vs when where while with within without whether which who whom whose why how
    what that this these those there here if then so because but nor yet compare contrast
    describe explain discuss list name give tell show plan suggest recommend choose pick rank
    should would could can may might must shall will do does did is are was were be been
    being am have has had i me we us you he she they them it its think consider help"""
)
# Words that open a phrase without naming anything: dropped from an item's ends.
_FILLER = _wordset(
    """a an the my your our their his her its some any each every all both either neither
    one two three four five more most less least other another such own very"""
)
_CONJUNCTIONS = frozenset({"and", "or", "vs", "versus"})
# Words no content n-gram may start or end with.
_FUNCTION = _FRAME | _FILLER | _CONJUNCTIONS | frozenset({"not", "no", "also", "just"})


def fold(phrase: str) -> str:
    """The key under which two spellings are one candidate: case folded, each word's plural
    ending folded ("Buses" and "bus", "cities" and "city", "Trains" and "train")."""
    words = []
    for word in phrase.casefold().split():
        if len(word) > 4 and word.endswith("ies"):
            word = word[:-3] + "y"
        elif len(word) > 4 and word.endswith(("ses", "xes", "zes", "ches", "shes")):
            word = word[:-2]
        elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
            word = word[:-1]
        words.append(word)
    return " ".join(words)


def _display(words: list[str]) -> str:
    """A title as the question spells it, first letter capitalised ("bicycles" -> "Bicycles")."""
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def _trim(words: list[str]) -> list[str]:
    """``words`` without filler ("a", "the", ...) and frame words at either end."""
    start, end = 0, len(words)
    while start < end and words[start].casefold() in _FILLER | _FRAME:
        start += 1
    while end > start and words[end - 1].casefold() in _FILLER | _FRAME:
        end -= 1
    return words[start:end]


def _clauses(text: str) -> list[list[str]]:
    """Word lists of ``text`` split at punctuation, each comma kept as a "," word so that a
    list's items stay in one clause ("food, sleep and exercise"). A run of words in one
    clause is separated by whitespace only, so it is a span of ``text`` once joined with
    spaces; a chunk that is not a plain word ("2+3", "km/h") splits the clause."""
    clauses: list[list[str]] = []
    for part in re.split(r"[.?!;:()\[\]\"\u201c\u201d\n]+", text):
        words: list[str] = []
        for chunk in re.sub(r",", " , ", part).split():
            if chunk == "," or _WORD_RE.fullmatch(chunk):
                words.append(chunk)
            elif words:
                clauses.append(words)
                words = []
        if words:
            clauses.append(words)
    return clauses


def _right_item(words: list[str], start: int) -> list[str]:
    """The item that follows a conjunction at ``start - 1``: up to `MAX_TITLE_WORDS` words,
    ending before a comma or a frame word once a content word was seen."""
    item: list[str] = []
    for word in words[start:]:
        low = word.casefold()
        content = any(w.casefold() not in _FILLER | _FRAME for w in item)
        if word == "," or low in _CONJUNCTIONS or (content and low in _FRAME):
            break
        item.append(word)
        if len(item) == MAX_TITLE_WORDS:
            break
    return _trim(item)


def _left_item(words: list[str], end: int, most: int) -> list[str]:
    """The item that ends at ``end`` (exclusive): at most ``most`` words back, stopping at a
    comma, a conjunction or a frame word once a content word was seen."""
    item: list[str] = []
    for word in reversed(words[:end]):
        low = word.casefold()
        content = any(w.casefold() not in _FILLER | _FRAME for w in item)
        if word == "," or low in _CONJUNCTIONS or (content and low in _FRAME):
            break
        item.insert(0, word)
        if len(item) == most:
            break
    return _trim(item)


def enumerated_items(question: str) -> list[str]:
    """The parts ``question`` lists, in order: ``X and Y``, ``X or Y``, ``X vs Y`` and
    ``X, Y(,) and Z``, each item at most `MAX_TITLE_WORDS` words, filler at its ends
    dropped ("Describe a chef, a waiter and a dishwasher" -> Chef, Waiter, Dishwasher).

    An item before the conjunction is at most as long as the one after it (lists are
    parallel: "Compare summer and winter holidays" -> Summer, Winter holidays). Items equal
    once folded (`fold`) count once. Returns [] when no list of 2 or more items is found.
    """
    items: list[list[str]] = []
    for words in _clauses(question):
        for c, word in enumerate(words):
            if word.casefold() not in _CONJUNCTIONS or c == 0:
                continue
            right = _right_item(words, c + 1)
            if not right:
                continue
            found = [right]
            end = c - 1 if words[c - 1] == "," else c  # "X, Y, and Z"
            most = max(len(right), 1)
            while end > 0:
                left = _left_item(words, end, most)
                if not left:
                    break
                found.insert(0, left)
                # Walk back over "X, " to the item before it; anything else ends the list.
                k = end - len(left)
                while k > 0 and words[k - 1] != "," and words[k - 1].casefold() in _FILLER:
                    k -= 1
                if k > 0 and words[k - 1] == ",":
                    end = k - 1
                    most = MAX_TITLE_WORDS
                else:
                    break
            if len(found) >= 2:
                items += found
    return _distinct(items)


def phrase_candidates(question: str, max_words: int = MAX_TITLE_WORDS) -> list[str]:
    """Content word n-grams of ``question`` (1..``max_words`` words inside one clause, not
    starting or ending with a function word, no comma or conjunction inside), longest first,
    then in order of appearance; spellings equal once folded count once."""
    grams: list[tuple[int, int, list[str]]] = []
    for words in _clauses(question):
        for i in range(len(words)):
            for n in range(1, max_words + 1):
                gram = words[i : i + n]
                if len(gram) < n or any(w == "," or w.casefold() in _CONJUNCTIONS for w in gram):
                    break
                if gram[0].casefold() in _FUNCTION or gram[-1].casefold() in _FUNCTION:
                    continue
                grams.append((-n, len(grams), gram))
    return _distinct([gram for *_, gram in sorted(grams, key=lambda g: (g[0], g[1]))])


def _distinct(items: list[list[str]]) -> list[str]:
    """Display forms of ``items``, the first of each folded spelling kept."""
    seen: set[str] = set()
    out = []
    for words in items:
        title = _display(words)
        key = fold(title)
        if key and key not in seen:
            seen.add(key)
            out.append(title)
    return out


def title_candidates(question: str, *, max_chars: int = 28, limit: int = 12) -> list[str]:
    """The titles the plan grammar offers for ``question``: its enumerated items
    (`enumerated_items`) that fit in ``max_chars`` characters and are valid titles (no ``#``
    or ``:``, starting with a letter), at most ``limit`` of them. Fewer than `MIN_CANDIDATES`
    means the question names no parallel parts: the plan's titles are then free.

    Only enumerated items are offered: content n-grams of a question that lists nothing
    ("How do I prepare for a job interview?" -> "Job interview", "Prepare") name its topic,
    not independent parts, and made worse plans than free titles.
    """
    out = [
        item
        for item in enumerated_items(question)
        if len(item) <= max_chars and item[:1].isalpha() and not set(item) & set("#:%")
    ]
    return out[:limit]


def lists_parallel_items(question: str) -> bool:
    """True when ``question`` lists 2 or more parts (`enumerated_items`) that are not proper
    names: "Who wrote Romeo and Juliet?" lists a title's words, not parts to answer apart,
    so a list whose items are all capitalised inside the sentence does not count."""
    items = enumerated_items(question)
    if len(items) < 2:
        return False
    names = 0
    for item in items:
        first = item.split()[0]
        at = [m.start() for m in re.finditer(rf"\b{re.escape(first)}\b", question, re.IGNORECASE)]
        spelled = [question[i : i + len(first)] for i in at if i > 0]
        if spelled and all(w[:1].isupper() for w in spelled):
            names += 1
    return names < len(items)
