"""Turn a model's free-text answer to a multiple-choice question into an option index.

The reference scripts are strict: ScienceQA's ``run_gpt3.py`` and LaVIN's ``eval.py``
only accept ``The answer is X`` (case-sensitive, and the letter must be followed by
some character, so a generation that ends right after the letter fails); LLaVA's
``eval_science_qa.py`` adds a bare letter and ``"X. ..."``. Anything else becomes a
random option (ScienceQA, LaVIN) or -1 (LLaVA) there. ``extract_answer`` accepts all of those and the other ways small
models phrase an answer, and returns ``None`` instead of guessing, so the scorer can
count unparsed answers (see ``pill.eval.scienceqa_score``).

Order of preference, first hit wins:

1. ``answer is X`` / ``answer: X`` / ``answer would be X`` (also ``(X)``, lower case);
2. the generation *starts* with a letter: ``B``, ``B.``, ``(B) cat``, ``B) cat``, ``B: cat``;
3. ``option X`` / ``choice X``;
4. with ``choices`` given: the answer text equals one option's text
   (``cat``, ``The answer is cat.``), ignoring case, quotes and a final period.

A letter past the last option (``The answer is F.`` with 3 options) is skipped; if
nothing else matches the result is ``None``.
"""

from __future__ import annotations

import re
from typing import Sequence

# Letter tokens. An upper-case letter counts anywhere after an answer cue ("The answer is
# A cat" is read as option A, as the official regex does); a lower-case "a" or "i" only
# when bracketed or not followed by a word, so "the answer is a mammal" is not option A.
# Only the cue words are case-insensitive: (?i:...) keeps [A-Z] meaning upper case.
_PAREN = r"\(\s*(?P<paren>[A-Za-z])\s*\)"
_UPPER = r"(?P<upper>[A-Z])(?![A-Za-z0-9])"
_LETTER_STRICT = (
    rf"(?:{_PAREN}|{_UPPER}|(?P<lower>[b-hj-z])(?![A-Za-z0-9])"
    r"|(?P<word>[ai])(?![A-Za-z0-9])(?!\s+[A-Za-z]))"  # "a"/"i" may be English words
)
_LETTER_LOOSE = rf"(?:{_PAREN}|{_UPPER}|(?P<lower>[a-z])(?![A-Za-z0-9]))"

_CUE_ANSWER = re.compile(
    r"(?i:\banswer\b\s*(?:is|would\s+be|should\s+be|will\s+be|:|-|=)?\s*:?\s*"
    r"(?:(?:option|choice|letter)\b\s*:?\s*)?)" + _LETTER_STRICT
)
# After "option"/"choice" a lone lower-case letter is a letter: "option a is correct".
_CUE_OPTION = re.compile(r"(?i:\b(?:option|choice)\s*:?\s*)" + _LETTER_LOOSE)
_LEADING = re.compile(r"^\s*(?:\(\s*(?P<paren>[A-Za-z])\s*\)|(?P<bare>[A-Za-z])(?=\s*(?:[.):,]|$)))")
_ANSWER_TEXT = re.compile(r"\banswer\s*(?:is|:)\s*(?P<text>[^\n]+)", re.IGNORECASE)

# Wrappers that chat models put around an answer and that carry no meaning here.
_NOISE = re.compile(r"\*\*|__|`|</?s>|<\|[^|>]*\|>")


def _letter(match: re.Match) -> str | None:
    for group in ("paren", "upper", "lower", "word", "bare"):
        value = match.groupdict().get(group)
        if value:
            return value.upper()
    return None


def _normalise(text: str) -> str:
    text = " ".join(text.strip().lower().split())
    return text.strip(" \"'“”‘’").rstrip(".!").strip(" \"'“”‘’")


def _to_index(letter: str | None, num_choices: int) -> int | None:
    if letter is None:
        return None
    index = ord(letter) - ord("A")
    return index if 0 <= index < num_choices else None


def _drop_article(text: str) -> str:
    stripped = re.sub(r"^(?:a|an|the)\s+", "", text)
    return stripped or text


def _match_choice_text(text: str, choices: Sequence[str]) -> int | None:
    wanted = _normalise(text)
    if not wanted:
        return None
    options = [_normalise(str(choice)) for choice in choices]
    hits = [i for i, option in enumerate(options) if option == wanted]
    if not hits:  # "a mammal" for the option "mammal"
        hits = [i for i, option in enumerate(options) if _drop_article(option) == _drop_article(wanted)]
    return hits[0] if len(hits) == 1 else None


def extract_answer(text: str, num_choices: int, choices: Sequence[str] | None = None) -> int | None:
    """Index of the option a generation picks, or ``None`` if it cannot be read.

    Args:
        text: the generated answer, e.g. ``"The answer is B. BECAUSE: ..."``.
        num_choices: how many options the question has (1..26).
        choices: the option texts; enables matching an answer given as option text.

    Returns:
        0-based option index, or ``None`` when no option can be read or the letter
        is past the last option.
    """
    if not 1 <= num_choices <= 26:
        raise ValueError(f"num_choices must be between 1 and 26, got {num_choices}")
    if choices is not None and len(choices) != num_choices:
        raise ValueError(f"choices has {len(choices)} entries but num_choices is {num_choices}")
    if not text:
        return None
    text = _NOISE.sub("", str(text))

    # A cue can catch a pronoun ("Answer: I think the answer is B"), so a letter past
    # the last option does not stop the search.
    for pattern in (_CUE_ANSWER, _LEADING, _CUE_OPTION):
        for match in pattern.finditer(text):
            index = _to_index(_letter(match), num_choices)
            if index is not None:
                return index

    if choices:
        found = _match_choice_text(text, choices)
        if found is not None:
            return found
        for match in _ANSWER_TEXT.finditer(text):
            # "The answer is cat. BECAUSE: ..." -> "cat"; try the whole line, then up to
            # the first sentence end, since option texts may themselves contain periods.
            candidate = match.group("text")
            found = _match_choice_text(candidate, choices)
            if found is None:
                found = _match_choice_text(re.split(r"\.\s|\.$", candidate)[0], choices)
            if found is not None:
                return found
    return None
