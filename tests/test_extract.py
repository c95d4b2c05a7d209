"""Answer extraction: every phrasing the reference scripts accept, and the sensible others."""

import pytest

from pill.eval.extract import extract_answer

CHOICES = ["dog", "cat", "a mammal"]

# (generation, expected index) with 3 options: A dog, B cat, C a mammal
CASES = [
    # The trained output formats (QCM-A, QCM-ALE, QCM-LEA) and the official regex.
    ("The answer is B.", 1),
    ("The answer is B", 1),  # the official regex needs a character after the letter
    ("The answer is (B)", 1),
    ("The answer is (B).", 1),
    ("The answer is: B", 1),
    ("the answer is b", 1),
    ("THE ANSWER IS C.", 2),
    ("Answer: The answer is A. BECAUSE: Dogs bark. Cats meow.", 0),
    ("Answer: The answer is C.\nBECAUSE: lecture text", 2),
    ("BECAUSE: The lecture mentions option A first. The answer is B.", 1),
    ("The answer is A cat.", 0),  # upper-case letter after the cue, as the official regex reads it
    ("The answer is B. The answer is C.", 1),  # first answer wins, as in LaVIN
    # "Answer:" and friends.
    ("Answer: B", 1),
    ("Answer: (B)", 1),
    ("answer: c", 2),
    ("Answer - A", 0),
    ("Answer (C)", 2),
    ("The correct answer is C", 2),
    ("The correct answer is option C.", 2),
    ("I think the answer would be A.", 0),
    ("Answer: I think the answer is B", 1),  # "I" is past the last option, so read on
    ("the answer is b because cats purr", 1),
    # A bare letter at the start (LLaVA's "B" and "B. ...").
    ("B", 1),
    ("b", 1),
    ("  C  ", 2),
    ("B.", 1),
    ("(B)", 1),
    ("( b )", 1),
    ("(B) cat", 1),
    ("B) cat", 1),
    ("B. cat", 1),
    ("B: cat", 1),
    ("A, because dogs bark", 0),
    # Option / choice cues.
    ("Option B", 1),
    ("option a is correct", 0),
    ("I choose choice C.", 2),
    # Markup around the answer.
    ("**B**", 1),
    ("The answer is **C**.", 2),
    ("`A`", 0),
    ("<s> The answer is B.</s>", 1),
    # Answer given as option text.
    ("cat", 1),
    ("Cat.", 1),
    ('"cat"', 1),
    ("a mammal", 2),
    ("mammal", 2),
    ("The answer is cat.", 1),
    ("The answer is dog. BECAUSE: it barks.", 0),
    ("the answer is a mammal", 2),  # lower-case "a" followed by a word is an article
    ("Answer: cat", 1),
    # Unparseable or out of range.
    ("The answer is F.", None),
    ("The answer is D", None),
    ("D", None),
    ("(E) horse", None),
    ("", None),
    ("   ", None),
    ("I don't know.", None),
    ("A cat is an animal", None),  # a leading "A" followed by a word is an article
    ("the answer is a bird", None),
    ("horse", None),
    ("The answer is Blue.", None),  # "B" inside a word is not a letter
    ("Answering this needs more context.", None),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_extract_with_choices(text, expected):
    assert extract_answer(text, 3, CHOICES) == expected


@pytest.mark.parametrize(
    "text,expected",
    [("The answer is B.", 1), ("(C) a mammal", 2), ("B", 1), ("cat", None), ("The answer is cat.", None)],
)
def test_extract_without_choices_reads_letters_only(text, expected):
    assert extract_answer(text, 3) == expected


def test_letter_range_follows_num_choices():
    assert extract_answer("The answer is E.", 5) == 4
    assert extract_answer("The answer is E.", 4) is None
    assert extract_answer("The answer is B.", 2) == 1
    assert extract_answer("The answer is C.", 2) is None


def test_ambiguous_option_text_is_not_guessed():
    assert extract_answer("cat", 2, ["cat", "Cat"]) is None


def test_grammar_options_a_and_an():
    # ScienceQA has questions whose options are the words "a" and "an".
    assert extract_answer("an", 2, ["a", "an"]) == 1
    assert extract_answer("The answer is B.", 2, ["a", "an"]) == 1


def test_option_text_with_period_inside():
    choices = ["7 liters", "7.5 milliliters"]
    assert extract_answer("The answer is 7.5 milliliters. BECAUSE: small.", 2, choices) == 1
    assert extract_answer("7 liters.", 2, choices) == 0


@pytest.mark.parametrize("num_choices", [0, 27])
def test_bad_num_choices(num_choices):
    with pytest.raises(ValueError, match="num_choices"):
        extract_answer("A", num_choices)


def test_choices_length_must_match():
    with pytest.raises(ValueError, match="choices has 2"):
        extract_answer("A", 3, ["x", "y"])
