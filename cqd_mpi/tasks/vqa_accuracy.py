"""The standard VQA accuracy (VQA v2, TextVQA): answer normalisation and the 10-annotator score.

An answer is normalised as the VQA challenge's evaluation (and TextVQA's EvalAI processor,
which LLaVA's TextVQA numbers use) normalises it: lower case, commas and question marks
dropped, punctuation removed (or made a space when it sits inside a word), a period that is
not a decimal point removed, number words zero..ten (and "none") made digits, the articles
a/an/the dropped, and apostrophe-less contractions ("dont") given their apostrophes.

A prediction's score against the annotators' answers is the mean, over the leave-one-out
subsets of the answers (10 for VQA's 10 annotators), of min(matches in the subset / 3, 1):
a prediction that matches 1, 2, 3 and 4+ of 10 answers scores 0.3, 0.6, 0.9 and 1. With a
single answer there is no subset to leave one out of, and the score is its exact match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
"""A period not followed by a digit (the challenge's pattern; its look-behind is literal text,
kept as it is so that scores equal the published ones)."""
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

_CONTRACTED_TEXT = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've"
)
_CONTRACTED = _CONTRACTED_TEXT.split()


def _contractions() -> dict[str, str]:
    """Each written form missing one apostrophe -> the contraction (the challenge's table)."""
    table = {}
    for word in _CONTRACTED:
        for position, char in enumerate(word):
            if char == "'":
                table.setdefault(word[:position] + word[position + 1:], word)
    return table


CONTRACTIONS = _contractions()


def _punctuation(text: str) -> str:
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if strip_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalize(answer: str) -> str:
    """The answer as the VQA evaluation compares it."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _punctuation(text)
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of `prediction` given the annotators' `answers` (see the module docstring)."""
    if not answers:
        raise ValueError("vqa_accuracy: expected at least one annotator answer, got none")
    predicted = normalize(prediction)
    truth = [normalize(answer) for answer in answers]
    if len(truth) == 1:
        return float(truth[0] == predicted)
    matches = sum(answer == predicted for answer in truth)
    total = 0.0
    for answer in truth:
        others = matches - (answer == predicted)
        total += min(others / 3.0, 1.0)
    return total / len(truth)
