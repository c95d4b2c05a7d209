"""ScienceQA accuracy, with exactly the categories of the official scorer.

The definitions follow ``tools/evaluate_acc.py`` in lupantech/ScienceQA (LaVIN and
LLaVA copy them):

- NAT / SOC / LAN: ``subject`` is natural / social / language science;
- TXT: the ``hint`` is non-empty; IMG: ``image`` is set (not null, not empty);
  NO: neither. Captions play no part: a problem with an image and an empty hint is
  IMG only, even when a caption is put in the prompt. TXT and IMG overlap;
- G1-6 / G7-12: ``grade`` is grade1..grade6 / grade7..grade12;
- Avg: all scored problems; plus one accuracy per ``topic``.

Differences from the official script, all on purpose: a category with no problems
is ``None`` (the script prints -1), percentages are unrounded floats (the script
formats them with two decimals), topics are the ones present in the scored problems
(the script lists 26 fixed topics), and an unparsed answer counts as wrong and is
counted, unless ``official_fallback`` asks for the reference scripts' random guess.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping, Sequence

from pill.data import read_json
from pill.data.scienceqa import load_problems, load_split
from pill.errors import DataError

CATEGORY_KEYS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
SCORE_KEYS = CATEGORY_KEYS + ("topics", "count", "unparsed")

_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_GRADES = {f"grade{g}": "G1-6" for g in range(1, 7)} | {f"grade{g}": "G7-12" for g in range(7, 13)}


def categories(problem: Mapping[str, Any]) -> list[str]:
    """The category keys (out of ``CATEGORY_KEYS``, Avg included) one problem counts toward."""
    keys = []
    subject = _SUBJECTS.get(problem.get("subject"))
    if subject:
        keys.append(subject)
    has_text = bool(problem.get("hint"))  # the official test is truthiness: "" and None are no text
    has_image = bool(problem.get("image"))
    if has_text:
        keys.append("TXT")
    if has_image:
        keys.append("IMG")
    if not has_text and not has_image:
        keys.append("NO")
    grade = _GRADES.get(problem.get("grade"))
    if grade:
        keys.append(grade)
    keys.append("Avg")
    return keys


def _percent(correct: int, total: int) -> float | None:
    return 100.0 * correct / total if total else None


def _valid_index(prediction: Any, num_choices: int) -> bool:
    return isinstance(prediction, int) and not isinstance(prediction, bool) and 0 <= prediction < num_choices


def score(
    predictions: Mapping[str, int | None],
    problems: Mapping[str, Mapping[str, Any]],
    qids: Sequence[str],
    *,
    official_fallback: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy of option-index predictions on the problems ``qids``.

    Args:
        predictions: qid -> 0-based option index, or ``None`` for an answer that could
            not be parsed. A qid of ``qids`` missing here, or an index outside the
            question's options, counts as unparsed too.
        problems: qid -> ScienceQA problem (``choices``, ``answer``, ``hint``,
            ``image``, ``subject``, ``grade``, ``topic``), as in ``problems.json``.
        qids: the problems to score, in order (the order fixes the fallback draws).
        official_fallback: replace each unparsed answer by a random option, drawn in
            ``qids`` order from ``random.Random(seed)`` as the reference scripts do
            (``random.choice(range(len(choices)))``), instead of counting it wrong.
        seed: seed of the fallback generator.

    Returns:
        ``{"NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"}`` as
        percentages (0-100, ``None`` for a category with no problem), ``"topics"``
        (topic -> percentage), ``"count"`` (problems scored) and ``"unparsed"``
        (predictions that were ``None``, missing or out of range).
    """
    rng = random.Random(seed)
    totals = dict.fromkeys(CATEGORY_KEYS, 0)
    correct = dict.fromkeys(CATEGORY_KEYS, 0)
    topic_totals: dict[str, int] = {}
    topic_correct: dict[str, int] = {}
    unparsed = 0

    for qid in qids:
        problem = problems.get(qid)
        if problem is None:
            raise DataError(f"problem {qid!r} is not in problems.json")
        try:
            num_choices = len(problem["choices"])
            answer = problem["answer"]
        except (KeyError, TypeError) as err:
            raise DataError(f"problem {qid!r} has no {err} field") from err

        prediction = predictions.get(qid)
        if not _valid_index(prediction, num_choices):
            unparsed += 1
            prediction = rng.choice(range(num_choices)) if official_fallback else None
        hit = int(prediction is not None and prediction == answer)

        for key in categories(problem):
            totals[key] += 1
            correct[key] += hit
        topic = problem.get("topic")
        if topic is not None:
            topic_totals[topic] = topic_totals.get(topic, 0) + 1
            topic_correct[topic] = topic_correct.get(topic, 0) + hit

    scores: dict[str, Any] = {key: _percent(correct[key], totals[key]) for key in CATEGORY_KEYS}
    scores["topics"] = {t: _percent(topic_correct[t], topic_totals[t]) for t in sorted(topic_totals)}
    scores["count"] = totals["Avg"]
    scores["unparsed"] = unparsed
    return scores


def _parse_prediction(value: Any, path: Path, qid: str) -> int | None:
    # LLaVA writes -1 and the GPT-3 script keeps "FAILED" for answers it could not parse.
    if value is None:
        return None
    if isinstance(value, bool):
        raise DataError(f"{path}: prediction for {qid!r} is {value!r}, expected an option index or letter")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        text = value.strip().strip("().").strip()
        if text == "" or text.upper() == "FAILED":
            return None
        if text.isdigit():
            return int(text)
        if len(text) == 1 and text.isascii() and text.isalpha():  # A = 0, B = 1, ...; past the options: unparsed
            return ord(text.upper()) - ord("A")
    raise DataError(f"{path}: prediction for {qid!r} is {value!r}, expected an option index or letter")


def load_predictions(path: str | Path) -> dict[str, int | None]:
    """Read predictions: qid -> option index, ``None`` where the answer was not parsed.

    Accepts the official result format ``{"results": {qid: index}, ...}`` (as written
    by ScienceQA's ``run_gpt3.py`` and LLaVA) and a plain ``{qid: index}`` mapping
    (as written by LaVIN). Values may be indices, letters (``"B"``), ``-1``,
    ``"FAILED"`` or ``null``; the last three mean unparsed.
    """
    path = Path(path)
    data = read_json(path, "predictions")
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        data = data["results"]
    if not isinstance(data, dict):
        raise DataError(f'{path}: expected {{"results": {{qid: option_index}}}} or {{qid: option_index}}')
    return {str(qid): _parse_prediction(value, path, str(qid)) for qid, value in data.items()}


def score_file(
    predictions_path: str | Path,
    data_root: str | Path,
    split: str = "test",
    *,
    official_fallback: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Score a predictions file against the ScienceQA data at ``data_root``.

    ``data_root`` is any layout ``pill.data.scienceqa`` reads: the official one
    (``problems.json`` + ``pid_splits.json``) or the Hugging Face parquet export.

    Scores the problems of ``split`` that have a prediction, in split order, so the
    output of a ``--limit``-ed run can be scored; ``count`` says how many. A predicted
    qid that is not in the split is an error.
    """
    predictions = load_predictions(predictions_path)  # the small file first: a bad one fails fast
    problems = load_problems(data_root)
    split_qids = load_split(data_root, split, problems)
    in_split = set(split_qids)
    foreign = [qid for qid in predictions if qid not in in_split]
    if foreign:
        shown = ", ".join(repr(q) for q in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise DataError(
            f"{predictions_path}: {len(foreign)} predicted qid(s) are not in split {split!r} "
            f"of {data_root}: {shown}"
        )
    missing = [qid for qid in split_qids if qid not in problems]
    if missing:
        raise DataError(f"{data_root}: split {split!r} lists qid {missing[0]!r}, which has no problem")
    qids = [qid for qid in split_qids if qid in predictions]
    return score(predictions, problems, qids, official_fallback=official_fallback, seed=seed)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(scores: Mapping[str, Any]) -> str:
    """Markdown: the category table, then one row per topic, then count and unparsed."""
    lines = [
        "| " + " | ".join(CATEGORY_KEYS) + " |",
        "|" + "---:|" * len(CATEGORY_KEYS),
        "| " + " | ".join(_cell(scores.get(key)) for key in CATEGORY_KEYS) + " |",
    ]
    topics = scores.get("topics") or {}
    if topics:
        lines += ["", "| topic | accuracy |", "|---|---:|"]
        lines += [f"| {topic} | {_cell(acc)} |" for topic, acc in topics.items()]
    lines += ["", f"scored: {scores.get('count', 0)}, unparsed answers: {scores.get('unparsed', 0)}"]
    return "\n".join(lines)
