"""Run a model on MME and write the official results format (scored by :mod:`pill.eval.mme_score`).

The benchmark's release (``MME_Benchmark_release_version``) has one folder per subtask, in one of
two layouts:

- ``<subtask>/images/<name>.jpg`` with ``<subtask>/questions_answers_YN/<name>.txt``
  (artwork, celebrity, landmark, posters, scene);
- ``<subtask>/<name>.jpg`` (or .png) beside ``<subtask>/<name>.txt`` (the others).

Each question file holds the two questions of its image, one per line: ``question<TAB>Yes|No``.
The results are one ``<subtask>.txt`` per subtask, one line per question: ``image name<TAB>
question<TAB>ground truth<TAB>answer`` (the layout of the official tool's ``Your_Results``), the
two questions of an image on consecutive lines; tabs and line breaks inside an answer become
spaces so that every question stays one line.

Protocols, as for ScienceQA (:mod:`pill.eval.evaluate`): ``pill`` asks with the run's chat template
and system message, the image placeholder on its own line before the question, greedy decoding;
``reference`` asks as the reference code's ``eval_mme.py`` does: ``[INST]`` + image slots +
question + ``[/INST]`` with no system message, sampling at temperature 0.1 and top-p 0.75, prompt
and answer at most 512 tokens. (That script looks for every image under ``<subtask>/images/``
only, so for the subtasks whose images sit beside their questions it asks without the image;
here both layouts are read.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..data import IMAGE_TOKEN, Sample
from ..errors import ConfigError, DataError
from .evaluate import PROTOCOLS, REFERENCE_SAMPLING, generate_answers
from .mme_score import SUBTASKS, format_scores, score_results  # noqa: F401  (format_scores: re-exported)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".JPG", ".JPEG", ".PNG")
DEFAULT_MAX_NEW_TOKENS = 16  # "Yes" / "No" and a few words: all the official parser reads is the first four characters


@dataclass(frozen=True)
class MMEQuestion:
    subtask: str
    image: str  # path of the image file
    question: str
    answer: str  # the ground truth, Yes or No

    @property
    def image_name(self) -> str:
        return Path(self.image).name


def _image_for(folder: Path, stem: str, question_file: Path) -> Path:
    for ext in IMAGE_EXTENSIONS:
        path = folder / f"{stem}{ext}"
        if path.is_file():
            return path
    raise DataError(f"{question_file}: no image {stem}.* ({', '.join(e for e in IMAGE_EXTENSIONS if e.islower())}) "
                    f"in {folder}")


def _read_question_file(path: Path, subtask: str, image: Path) -> list[MMEQuestion]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != 2:
        raise DataError(f"{path}: expected the two questions of its image, one per line, got {len(lines)} lines")
    out = []
    for n, line in enumerate(lines, 1):
        question, sep, answer = line.rpartition("\t")
        if not sep or not question.strip():
            raise DataError(f"{path}:{n}: expected 'question<TAB>Yes|No', got {line[:80]!r}")
        if answer.strip().lower() not in ("yes", "no"):
            raise DataError(f"{path}:{n}: the answer must be Yes or No, got {answer.strip()!r}")
        out.append(MMEQuestion(subtask, str(image), question.strip(), answer.strip()))
    return out


def load_mme(root: str | Path, subtasks: Optional[list[str]] = None) -> dict[str, list[MMEQuestion]]:
    """The questions of every subtask folder under ``root`` (default: the official subtasks found
    there), in file-name order, two per image. DataError names a malformed file."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: MME folder not found")
    if subtasks is None:
        subtasks = [s for s in SUBTASKS if (root / s).is_dir()]
        if not subtasks:
            raise DataError(f"{root}: no MME subtask folders ({', '.join(SUBTASKS)}); pass the "
                            "MME_Benchmark_release_version folder")
    out = {}
    for name in subtasks:
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"{folder}: subtask folder not found")
        qa = folder / "questions_answers_YN"
        images = folder / "images" if qa.is_dir() else folder
        files = sorted((qa if qa.is_dir() else folder).glob("*.txt"))
        if not files:
            raise DataError(f"{folder}: no question files (*.txt{' in questions_answers_YN' if qa.is_dir() else ''})")
        out[name] = [q for f in files for q in _read_question_file(f, name, _image_for(images, f.stem, f))]
    return out


def _sample(q: MMEQuestion, index: int, protocol: str, system_prompt: Optional[str]) -> Sample:
    if protocol == "reference":  # eval_mme.py: "[INST]" + image + question + "[/INST]", no system message
        messages = [{"role": "user", "content": f"{IMAGE_TOKEN}{q.question}"}]
        meta = {"template": "reference"}
    else:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": f"{IMAGE_TOKEN}\n{q.question}"})
        meta = {}
    return Sample(id=f"{q.subtask}/{index}", messages=messages, images=[q.image], meta=meta)


def _clean(answer: str) -> str:
    return " ".join(answer.replace("\t", " ").splitlines()).strip()


def evaluate_mme(vlm, root: str | Path, out_dir: str | Path, *, subtasks: Optional[list[str]] = None,
                 protocol: str = "pill", batch_size: int = 8, max_new_tokens: Optional[int] = None,
                 seed: int = 0, limit: Optional[int] = None, progress: bool = True) -> dict[str, Any]:
    """Answer the MME questions under ``root`` and write ``out_dir/<subtask>.txt`` (official format).

    Args:
        vlm: a :class:`~pill.vlm.PillVLM` with a tokenizer (e.g. from :func:`pill.build.load_run`).
        subtasks: which subtask folders (default: every official one under ``root``).
        protocol: ``pill`` or ``reference`` (module docstring).
        max_new_tokens: answer length; default 16 (``pill``) or 512 (``reference``).
        seed: seed of the reference protocol's sampling.
        limit: only the first ``limit`` images of each subtask (two questions each).
    Returns :func:`~pill.eval.mme_score.score_results` of the written folder plus ``files``,
    ``protocol`` and ``seconds``.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit: must be >= 1, got {limit}")
    reference = protocol == "reference"
    if max_new_tokens is None:
        max_new_tokens = REFERENCE_SAMPLING["max_new_tokens"] if reference else DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    sampling = ({k: REFERENCE_SAMPLING[k] for k in ("temperature", "top_p", "max_length")} | {"seed": seed}
                if reference else {})
    questions = load_mme(root, subtasks)  # every file is checked before the model runs
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ..io import write_atomic

    files = {}
    was_training = vlm.training
    vlm.eval()
    try:
        for name, qs in questions.items():
            qs = qs[: 2 * limit] if limit is not None else qs
            samples = [_sample(q, i, protocol, getattr(vlm, "system_prompt", None)) for i, q in enumerate(qs)]
            answers = generate_answers(vlm, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       progress=progress, desc=f"MME {name}", **sampling)
            lines = [f"{q.image_name}\t{_clean(q.question)}\t{q.answer}\t{_clean(a)}\n" for q, a in zip(qs, answers)]
            files[name] = str(out / f"{name}.txt")
            write_atomic(files[name], "".join(lines))
    finally:
        vlm.train(was_training)
    scores = score_results(out)
    return {**scores, "files": files, "protocol": protocol, "seconds": time.perf_counter() - start}


__all__ = ["MMEQuestion", "load_mme", "evaluate_mme", "DEFAULT_MAX_NEW_TOKENS"]
