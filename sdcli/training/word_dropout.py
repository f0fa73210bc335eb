"""data.prompt_word_dropout and data.prompt_word_shuffle: the question the student sees when it
learns on a demonstration, with some of its words left out and, on some visits, the rest in a
random order (drawn anew on every visit), never leaving out a word the demonstration also uses.
The teacher always sees the whole question (docs/learning.md, "Leaving out question words",
"Questions in any order")."""

from __future__ import annotations

import random
import re

from sdcli.core.data import Messages, last_user_text, with_last_user_text
from sdcli.signals.base import Example


def _plain(word: str) -> str:
    return word.strip(".,;:!?\"'()[]{}").lower()


def _related(a: str, b: str) -> bool:
    """The same word, or two words of four letters or more that begin alike ("wing" / "wings",
    "independence" / "independent"): a crude stem, good enough to find the words two sentences share."""
    n = min(len(a), len(b), 5)
    return a == b or (n >= 4 and a[:n] == b[:n])


def answer_words(question: str, answer: str) -> set[str]:
    """The question's words (lowercased, punctuation stripped) that the answer also uses: what ties
    the question to its answer, such as the entity and the attribute asked about."""
    said = [_plain(w) for w in answer.split()]
    return {p for p in map(_plain, question.split()) if p and any(_related(p, w) for w in said)}


def without_some_words(prompt: Messages, share: float, key: str, keep: set[str] = frozenset(),
                       shuffle: float = 0.0) -> Messages:
    """The prompt with each word of its last user turn left out with probability `share`, except
    the words in `keep` (lowercased, punctuation stripped); at least one word stays. With
    probability `shuffle` the words that stay then trade places at random. The draw is a function
    of `key` alone, so a resumed run, or another rank, gets the same question. A word is a run of
    non-space characters; the layout stays (`_rejoined`). Text written without spaces (Chinese,
    Japanese, Thai) is one word, and nothing is left out of it."""
    if share == 0.0 and shuffle == 0.0:
        return prompt
    text = last_user_text(prompt)
    words = list(re.finditer(r"\S+", text))
    draw = random.Random(key)
    kept = [w for w in words if draw.random() >= share or _plain(w.group()) in keep]
    if not kept and words:
        kept = [words[draw.randrange(len(words))]]
    order = [w.group() for w in kept]
    if shuffle and draw.random() < shuffle:
        draw.shuffle(order)
    return with_last_user_text(prompt, _rejoined(text, kept, order))


def _rejoined(text: str, kept: list[re.Match], words: list[str]) -> str:
    """`words` (the kept words of `text`, or the same in another order) in the kept words' places,
    each after the space that stood before its place. Where words between two kept ones were left
    out, the longest line break among the spaces they leave is the one that stays, so that lines,
    paragraphs and a code block's indentation never run together."""
    if not kept:
        return text
    out = [text[: len(text) - len(text.lstrip())]]
    for before, place, word in zip([None, *kept], kept, words):
        if before is not None:
            gaps = re.findall(r"\s+", text[before.end() : place.start()])
            out.append(max(gaps, key=lambda gap: (gap.count("\n"), gap == gaps[-1])))
        out.append(word)
    out.append(text[len(text.rstrip()) :])
    return "".join(out)


def student_prompt(ex: Example, word_dropout: float, seed: int, answer: str = "", word_shuffle: float = 0.0) -> Messages:
    """What the student sees when it learns on the example's demonstration `answer`: the prompt,
    some of its words left out on this visit (`data.prompt_word_dropout`), never one the answer
    also uses, and on some visits the rest in a random order (`data.prompt_word_shuffle`), so that
    the answer is learned from the question's key words and not from one wording of it."""
    if word_dropout == 0.0 and word_shuffle == 0.0:
        return ex.prompt
    keep = answer_words(last_user_text(ex.prompt), answer)
    return without_some_words(ex.prompt, word_dropout, f"{seed}:{ex.id}:{ex.visit}", keep, word_shuffle)
