"""Exact-match scores for short answers (ScanQA / SQA3D conventions).

EM: the prediction equals one of the answers (surrounding whitespace ignored).
Refined EM: after `normalize_answer` (lowercase, punctuation stripped, numbers written as words,
articles dropped), one string with its spaces removed contains the other. An empty normalised
prediction only matches an empty answer: a plain substring test would count "" as contained in
every answer.
Normalised EM (the validation metric of experiments/train.py): the normalised prediction equals
one of the normalised answers.

The released 3D-LLM's scripts (`calculate_scores/calculate_score_{scanqa,sqa3d,3dmvvqa}.py`)
score differently: `release_clean_answer` removes every `,`, `<pad>` and `</s>` from the
prediction, strips it and keeps its first line; `release_exact_match` then asks whether that
string is one of the answers as they are (no normalisation, no stripping). SQA3D question types
there come from ordered, case-sensitive substring tests on the whole question text
(`sqa3d_release_question_type`), not from its first word.
"""

from __future__ import annotations

import re
import string

_ARTICLES = frozenset({"a", "an", "the"})
_LOCATION_SPAN = re.compile(r"<(box|pt)>.*?</\1>", re.DOTALL)
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

# SQA3D reports accuracy by the question's first word.
SQA3D_QUESTION_TYPES = ("what", "is", "how", "can", "which", "others")
# The released 3D-LLM's SQA3D types: the first of these substrings found in the question, in this
# order (case-sensitive), else "Other".
SQA3D_RELEASE_QUESTION_TYPES = ("What", "How", "Can", "Is", "Which", "Other")


def number_to_words(n: int) -> str:
    """0..999 as English words ("42" -> "forty two"); larger numbers stay digits."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    return str(n)


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation -> space, digits -> words, articles dropped, single spaces."""
    words = []
    for word in _PUNCT.sub(" ", text.lower()).split():
        if word in _ARTICLES:
            continue
        words.append(number_to_words(int(word)) if word.isdigit() else word)
    return " ".join(words)


def strip_locations(text: str) -> str:
    """Text with its `<box>`/`<pt>` spans removed (scored apart, as boxes), single spaces."""
    return re.sub(r"\s+", " ", _LOCATION_SPAN.sub(" ", text)).strip()


def normalized_exact_match(pred: str, answers: list[str]) -> bool:
    """`normalize_answer(pred)` equals one of the normalised answers (no containment)."""
    pred = normalize_answer(pred)
    return any(pred == normalize_answer(a) for a in answers)


def exact_match(pred: str, answers: list[str]) -> bool:
    pred = pred.strip()
    return any(pred == a.strip() for a in answers)


def refined_exact_match(pred: str, answers: list[str]) -> bool:
    p = normalize_answer(pred).replace(" ", "")
    for answer in answers:
        a = normalize_answer(answer).replace(" ", "")
        if p == a or (p and a and (p in a or a in p)):
            return True
    return False


def answer_metrics(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    """{"EM", "EM-refined"} x100; `preds` and `refs` must hold the same ids."""
    check_ids(preds, refs)
    n = max(len(preds), 1)
    em = sum(exact_match(preds[k], refs[k]) for k in preds)
    refined = sum(refined_exact_match(preds[k], refs[k]) for k in preds)
    return {"EM": 100.0 * em / n, "EM-refined": 100.0 * refined / n}


def sqa3d_question_type(question: str) -> str:
    """SQA3D's question type: the first word when it is one of what/is/how/can/which, else others."""
    words = _PUNCT.sub(" ", question.lower()).split()
    first = words[0] if words else ""
    return first if first in SQA3D_QUESTION_TYPES[:-1] else "others"


def last_question(prompt: str) -> str:
    """The last sentence of a prompt (SQA3D prompts are `situation question`)."""
    parts = [p for p in re.split(r"(?<=[.!?])\s+", prompt.strip()) if p]
    return parts[-1] if parts else ""


def sqa3d_release_question_type(question: str) -> str:
    """The released 3D-LLM's SQA3D type: "What" if the text contains "What", else "How", "Can",
    "Is", "Which" in that order, else "Other" (so "How many... What..." is "What")."""
    for name in SQA3D_RELEASE_QUESTION_TYPES[:-1]:
        if name in question:
            return name
    return "Other"


def release_clean_answer(text: str) -> str:
    """A prediction as the released 3D-LLM scores it: `,` `<pad>` `</s>` removed, stripped, its
    first line."""
    text = text.replace(",", "").replace("<pad>", "").replace("</s>", "").strip()
    return text.split("\n")[0]


def release_exact_match(pred: str, answers: list[str]) -> bool:
    """The released 3D-LLM's EM: the cleaned prediction is one of the answers, character for
    character (answers are not cleaned)."""
    return release_clean_answer(pred) in answers


def em_by_question_type(
    preds: dict[str, str], refs: dict[str, list[str]], question_types: dict[str, str]
) -> dict[str, float]:
    """EM x100 per question type (keys `EM/<type>`, only types that occur) and overall `EM`.

    `question_types` maps each id to its type, e.g. `sqa3d_question_type(question)`.
    """
    check_ids(preds, refs)
    hits: dict[str, list[bool]] = {}
    for key, pred in preds.items():
        if key not in question_types:
            raise ValueError(f"no question type for id {key!r}")
        hits.setdefault(question_types[key], []).append(exact_match(pred, refs[key]))
    out = {f"EM/{t}": 100.0 * sum(h) / len(h) for t, h in sorted(hits.items())}
    out["EM"] = 100.0 * sum(sum(h) for h in hits.values()) / max(len(preds), 1)
    return out


def check_ids(preds: dict[str, str], refs: dict[str, list[str]]) -> None:
    missing = [k for k in preds if k not in refs]
    if missing:
        raise ValueError(f"{len(missing)} predictions have no references, e.g. {missing[:3]}")
    unanswered = [k for k in refs if k not in preds]
    if unanswered:
        raise ValueError(f"{len(unanswered)} ids have no prediction, e.g. {unanswered[:3]}")
    empty = [k for k in preds if not refs[k]]
    if empty:
        raise ValueError(f"{len(empty)} ids have an empty reference list, e.g. {empty[:3]}")
