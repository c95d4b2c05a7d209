"""MME scores, as the benchmark's official ``eval_tool/calculation.py`` computes them.

A results folder holds one tab-separated ``<subtask>.txt`` per subtask, one line per question:
``image name, question, ground truth (Yes/No), answer``; the two questions of an image on
consecutive lines. Per subtask:

- an answer is read as the official tool does (:func:`parse_answer`): ``yes`` / ``no`` when it is
  exactly that, else ``yes`` when its first four characters contain "yes", ``no`` when they
  contain "no", else ``other`` -- which never equals the ground truth;
- ``acc``: questions answered right / questions; ``acc_plus``: images with both questions right /
  images; the subtask's score is ``100 * acc + 100 * acc_plus`` (at most 200).

Perception is the sum over its ten subtasks (at most 2000), cognition over its four (800).
The official tool also prints precision and recall; they are not part of the score and not
computed here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import DataError

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION


def parse_answer(answer: str) -> str:
    """``yes``, ``no`` or ``other``, as the official tool reads a model's answer."""
    pred = answer.lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def read_results(path: str | Path) -> list[tuple[str, str, str, str]]:
    """The ``(image, question, ground truth, answer)`` rows of one results file; DataError names the
    file and line of a malformed row."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4:
            raise DataError(f"{path}:{n}: expected 4 tab-separated fields (image, question, ground truth, answer), "
                            f"got {len(parts)}")
        if parts[2].strip().lower() not in ("yes", "no"):
            raise DataError(f"{path}:{n}: ground truth must be Yes or No, got {parts[2]!r}")
        rows.append((parts[0], parts[1], parts[2].strip(), parts[3]))
    return rows


def score_subtask(rows: list[tuple[str, str, str, str]], source: str = "results") -> dict[str, Any]:
    """``{"acc", "acc_plus", "score", "questions", "images", "other"}`` of one subtask (acc and
    acc_plus in per cent). Consecutive rows pair up per image, as in the official tool."""
    if not rows:
        raise DataError(f"{source}: no questions")
    if len(rows) % 2:
        raise DataError(f"{source}: {len(rows)} questions; MME asks two per image")
    right = plus = other = 0
    for k in range(0, len(rows), 2):
        pair = rows[k:k + 2]
        if pair[0][0] != pair[1][0]:
            raise DataError(f"{source}: questions {k + 1} and {k + 2} are about different images "
                            f"({pair[0][0]}, {pair[1][0]}); the two questions of an image must be consecutive")
        hits = 0
        for _, _, gt, answer in pair:
            pred = parse_answer(answer)
            other += pred == "other"
            hits += pred == gt.lower()
        right += hits
        plus += hits == 2
    acc, acc_plus = 100.0 * right / len(rows), 100.0 * plus / (len(rows) // 2)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": len(rows),
            "images": len(rows) // 2, "other": other}


def score_results(results_dir: str | Path) -> dict[str, Any]:
    """Scores of every official subtask that has a ``<subtask>.txt`` in ``results_dir``.

    Returns ``{"subtasks": {name: score_subtask(...)}, "perception", "cognition", "missing"}``:
    the totals sum the subtasks present; ``missing`` lists the official subtasks without a file
    (a total with missing subtasks is not comparable to published ones)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise DataError(f"{root}: results folder not found")
    subtasks, missing = {}, []
    for name in SUBTASKS:
        path = root / f"{name}.txt"
        if not path.is_file():
            missing.append(name)
            continue
        subtasks[name] = score_subtask(read_results(path), str(path))
    if not subtasks:
        raise DataError(f"{root}: no MME results files (<subtask>.txt for {', '.join(SUBTASKS)})")
    total = {group: sum(subtasks[n]["score"] for n in names if n in subtasks)
             for group, names in (("perception", PERCEPTION), ("cognition", COGNITION))}
    return {"subtasks": subtasks, **total, "missing": missing}


def format_scores(scores: Mapping[str, Any]) -> str:
    """Markdown: one row per subtask (acc, acc+, score), then the two totals."""
    lines = ["| subtask | acc | acc+ | score | other |", "|---|---:|---:|---:|---:|"]
    for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
        for name in names:
            s = scores["subtasks"].get(name)
            if s is not None:
                lines.append(f"| {name} | {s['acc']:.2f} | {s['acc_plus']:.2f} | {s['score']:.2f} | {s['other']} |")
        lines.append(f"| **{group}** | | | **{scores[group]:.2f}** | |")
    if scores.get("missing"):
        lines += ["", f"missing subtasks (not in the totals): {', '.join(scores['missing'])}"]
    return "\n".join(lines)


__all__ = ["PERCEPTION", "COGNITION", "SUBTASKS", "parse_answer", "read_results", "score_subtask", "score_results",
           "format_scores"]
