"""ScienceQA: the official layout and the Hugging Face parquet export, as Samples.

Official layout (``root/``)::

    problems.json            qid -> problem (question, choices, answer, hint, image, ...)
    pid_splits.json          split -> [qid, ...]  (train, val, test, minitest, ...)
    captions.json            optional, {"captions": {qid: text}}
    images/<split>/<qid>/image.png   (``<split>/<qid>/image.png`` under root also works)
    audio/<split>/<qid>/clip.wav     for problems whose ``audio`` field names a clip (or a list of
                                     clips); any registered modality's field works the same way

Hugging Face export: parquet files with one row per problem, the image as
``{"bytes", "path"}``, and the same fields; the split comes from a ``split`` column
or the file name (``train-0000-of-0001.parquet``, ``validation-...``, ``test-...``).
Rows get qids from an ``id``/``qid``/``pid`` column, else ``<split>-<row>``.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import DataError
from ..modalities import modalities
from . import (BadSample, LoadReport, Sample, SampleList, check_image, check_input_file, check_placeholders, inside_root,
               read_json)
from .prompts import OPTION_LETTERS, PromptOptions, build_target, parse_format, scienceqa_messages, style_template

PathLike = Union[str, os.PathLike]

REQUIRED_FIELDS = ("question", "choices", "answer")
_PARQUET_FIELDS = ("question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category",
                   "skill", "lecture", "solution")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
_SPLIT_FROM_NAME = re.compile(r"^(minitrain|minival|minitest|trainval|train|validation|valid|val|test|dev)(?![a-z])")


def _split_name(name: str) -> str:
    return _SPLIT_ALIASES.get(name, name)


# -- sources ----------------------------------------------------------------------------

def _parquet_files(root: Path) -> list[Path]:
    if root.is_file() and root.suffix == ".parquet":
        return [root]
    if root.is_dir() and not (root / "problems.json").is_file():
        return sorted(root.rglob("*.parquet"))
    return []


def _is_official(root: Path) -> bool:
    return root.is_dir() and (root / "problems.json").is_file()


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"{root}: ScienceQA root not found")
    if not _is_official(root) and not _parquet_files(root):
        raise DataError(f"{root}: not a ScienceQA folder (no problems.json) and no parquet files found")


def _image_field(value: Any, file: Path, row: int) -> Optional[bytes]:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) or None
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return bytes(data)
        if value.get("path"):
            raise DataError(f"{file}: row {row}: image given only as a path ({value['path']!r}), no bytes")
        return None
    raise DataError(f"{file}: row {row}: image column holds {type(value).__name__}, expected bytes or a struct")


def _read_parquet(files: list[Path], with_images: bool = True) -> tuple[dict[str, dict], dict[str, Optional[bytes]]]:
    """Problems (qid -> problem dict with ``split`` and ``image``) and their image bytes."""
    import pyarrow.parquet as pq

    problems: dict[str, dict] = {}
    images: dict[str, Optional[bytes]] = {}
    rows_per_split: dict[str, int] = {}
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as e:  # pyarrow raises several unrelated types for bad files
            raise DataError(f"{file}: cannot read parquet file ({e})") from None
        names = table.column_names
        missing = [c for c in REQUIRED_FIELDS if c not in names]
        if missing:
            raise DataError(f"{file}: parquet file lacks the column(s) {', '.join(missing)} (has: {', '.join(names)})")
        if "split" not in names:
            m = _SPLIT_FROM_NAME.match(file.name.lower())
            if not m:
                raise DataError(f"{file}: no 'split' column and the file name does not start with a split name "
                                "(train, validation, test, ...)")
            file_split = _split_name(m.group(1))
        id_column = next((c for c in ("qid", "pid", "id") if c in names), None)
        columns = [c for c in names if c != "image" or with_images]
        for row, record in enumerate(table.select(columns).to_pylist()):
            split = _split_name(str(record["split"])) if "split" in names else file_split
            index = rows_per_split.get(split, 0)
            rows_per_split[split] = index + 1
            qid = str(record[id_column]) if id_column else f"{split}-{index}"
            if qid in problems:
                raise DataError(f"{file}: row {row}: duplicate problem id {qid!r}")
            image = _image_field(record.pop("image", None), file, row) if with_images else None
            problem = {k: record.get(k) for k in _PARQUET_FIELDS if k in record}
            problem["image"] = "image.png" if image is not None else None
            problem["split"] = split
            problems[qid] = problem
            images[qid] = image
    return problems, images


def load_problems(root: PathLike) -> dict[str, dict]:
    """qid -> raw problem dict (the scorer's input), from either layout."""
    root = Path(root)
    _check_root(root)
    if _is_official(root):
        problems = read_json(root / "problems.json", "problems.json")
        if not isinstance(problems, dict):
            raise DataError(f"{root / 'problems.json'}: expected an object qid -> problem, "
                            f"got {type(problems).__name__}")
        return problems
    # the image column is read only to know which problems have an image
    problems, _ = _read_parquet(_parquet_files(root), with_images=True)
    return problems


def _read_splits(root: Path) -> dict[str, list[str]]:
    path = root / "pid_splits.json"
    splits = read_json(path, "pid_splits.json")
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise DataError(f"{path}: expected an object split -> list of qids")
    return splits


def load_split(root: PathLike, split: str, problems: Optional[dict] = None) -> list[str]:
    """The qids of ``split`` (``pid_splits.json``, or the parquet rows of that split), in file order."""
    root = Path(root)
    _check_root(root)
    if _is_official(root):
        splits = _read_splits(root)
        key = split if split in splits else _split_name(split)
        if key not in splits:
            raise DataError(f"{root / 'pid_splits.json'}: no split {split!r}; available: {', '.join(splits)}")
        return [str(q) for q in splits[key]]
    problems = problems if problems is not None else load_problems(root)
    want = _split_name(split)
    qids = [q for q, p in problems.items() if p.get("split") == want]
    if not qids:
        available = sorted({p.get("split") for p in problems.values()})
        raise DataError(f"{root}: no problems in split {split!r}; available: {', '.join(map(str, available))}")
    return qids


def load_captions(path: PathLike) -> dict[str, str]:
    """``captions.json`` -> qid -> caption."""
    data = read_json(path, "captions.json")
    captions = data.get("captions") if isinstance(data, dict) else None
    if not isinstance(captions, dict):
        raise DataError(f"{path}: expected an object with a 'captions' object (qid -> text)")
    return {str(k): str(v) for k, v in captions.items()}


# -- validation -------------------------------------------------------------------------

def validate_problem(problem: Any, qid: str, source: str, need: str = "") -> None:
    """Raise BadSample (reason: missing_field, bad_field, empty_choices, too_many_choices, bad_answer).

    ``need`` lists extra text fields the format uses: ``L`` lecture, ``E`` solution.
    """
    where = f"{source}: problem {qid}"
    if not isinstance(problem, dict):
        raise BadSample(f"{where}: expected an object, got {type(problem).__name__}", "bad_field")
    required = list(REQUIRED_FIELDS) + [f for c, f in (("L", "lecture"), ("E", "solution")) if c in need]
    missing = [f for f in required if f not in problem or problem[f] is None]
    if missing:
        raise BadSample(f"{where}: missing required field(s) {', '.join(missing)}", "missing_field")
    if not isinstance(problem["question"], str):
        raise BadSample(f"{where}: 'question' must be a string", "bad_field")
    choices = problem["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise BadSample(f"{where}: 'choices' must be a list of strings", "bad_field")
    if not choices:
        raise BadSample(f"{where}: 'choices' is empty", "empty_choices")
    if len(choices) > len(OPTION_LETTERS):
        raise BadSample(f"{where}: {len(choices)} choices, at most {len(OPTION_LETTERS)} are supported",
                        "too_many_choices")
    answer = problem["answer"]
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise BadSample(f"{where}: 'answer' must be an integer option index, got {answer!r}", "bad_field")
    if not 0 <= answer < len(choices):
        raise BadSample(f"{where}: answer index {answer} is out of range for {len(choices)} choices", "bad_answer")
    for key in ("hint", "lecture", "solution"):
        if problem.get(key) is not None and not isinstance(problem[key], str):
            raise BadSample(f"{where}: {key!r} must be a string", "bad_field")
    if problem.get("image") is not None and not isinstance(problem["image"], str):
        raise BadSample(f"{where}: 'image' must be a file name or null", "bad_field")
    for m in _other_modalities():
        value = problem.get(m.json_field)
        if value is not None and not (isinstance(value, str) or
                                      (isinstance(value, list) and all(isinstance(v, str) and v for v in value))):
            raise BadSample(f"{where}: {m.json_field!r} must be a file name, a list of file names, or null",
                            "bad_field")


def _other_modalities():
    """The registered modalities besides image, whose files a problem names in its own field."""
    return [m for m in modalities() if m.name != "image"]


def input_paths(root: PathLike, qid: str, problem: dict, split: str, field: str) -> list[str]:
    """Where the files a problem names in ``field`` (``audio``) are: ``<field>/<s>/<qid>/<name>``
    (or ``<s>/<qid>/<name>``), ``s`` the problem's own split or the requested one."""
    value = problem.get(field)
    names = [] if not value else [value] if isinstance(value, str) else list(value)
    root = Path(root)
    out = []
    for name in names:
        candidates = []
        for s in dict.fromkeys(x for x in (problem.get("split"), split, _split_name(split)) if x):
            candidates += [str(root / field / s / qid / name), str(root / s / qid / name)]
        out.append(next((c for c in candidates if os.path.exists(c)), candidates[0]))
    return out


def image_path(root: PathLike, qid: str, problem: dict, split: str, *, allow_outside_root: bool = False,
               where: str = "") -> tuple[str, list[str]]:
    """Where the image of ``problem`` is: the first existing candidate (and all candidates tried).

    Tries ``images/<s>/<qid>/<name>`` then ``<s>/<qid>/<name>`` for ``s`` the problem's own
    split, then the requested one (``minitest`` problems live in ``test/``). A candidate that
    resolves outside ``root`` (a qid or image name with ``../``, an absolute name, a symlink out)
    raises BadSample (``outside_root``) before anything is looked up, unless ``allow_outside_root``;
    ``where`` names the file and problem in that message.
    """
    name = problem.get("image") or "image.png"
    candidates = []
    for s in dict.fromkeys(x for x in (problem.get("split"), split, _split_name(split)) if x):
        for rel in (os.path.join("images", s, qid, name), os.path.join(s, qid, name)):
            candidates.append(inside_root(root, rel, what="image", where=where or f"{root}: problem {qid}",
                                          root_name="the ScienceQA root", allow_outside=allow_outside_root))
    found = next((c for c in candidates if os.path.exists(c)), None)
    return (found or candidates[0]), candidates


# -- random wrong answer ------------------------------------------------------------------

def wrong_answer_variant(sample: Sample, seed: int, epoch: int, p: float) -> Sample:
    """The sample to train on this epoch: with probability ``p`` its target states another option.

    The draw depends only on (seed, epoch, sample id): the same in every process and worker,
    and re-drawn each epoch. Returns ``sample`` itself when nothing changes (``p`` is 0, the
    draw keeps the answer, or the sample is not a ScienceQA problem), else a copy whose
    assistant turn and ``meta["target_answer"]`` state the drawn option.
    """
    meta = sample.meta
    if p <= 0 or not all(k in meta for k in ("answer", "choices", "format", "problem")):
        return sample
    answer = _draw_answer(seed, epoch, sample.id, meta["answer"], len(meta["choices"]), p)
    if answer == meta.get("target_answer", meta["answer"]):
        return sample
    _, output_format = parse_format(meta["format"])
    target = build_target(meta["problem"], output_format, answer=answer, **meta.get("text_options", {}))
    messages = list(sample.messages[:-1]) + [{"role": "assistant", "content": target}]
    return replace(sample, messages=messages, meta={**meta, "target_answer": answer})


def _draw_answer(seed: int, epoch: int, qid: str, answer: int, num_choices: int, p: float) -> int:
    if num_choices < 2:
        return answer
    rng = random.Random(f"pill-wrong-answer:{seed}:{epoch}:{qid}")
    if rng.random() >= p:
        return answer
    wrong = rng.randrange(num_choices - 1)
    return wrong + (wrong >= answer)


# -- loading ----------------------------------------------------------------------------

def load_scienceqa(
    root: PathLike,
    split: str,
    options: Optional[PromptOptions] = None,
    *,
    prompt_format: Optional[str] = None,
    use_caption: Optional[bool] = None,
    system_prompt: Optional[str] = None,
    prompt_style: Optional[str] = None,
    captions: Optional[PathLike] = None,
    skip_bad: bool = False,
    check_images: bool = True,
    max_pixels: Optional[int] = None,
    limit: Optional[int] = None,
    progress: bool = True,
    allow_outside_root: bool = False,
) -> SampleList:
    """Load one split of ScienceQA as chat samples.

    Args:
        root: the official folder, a folder of parquet files, or one parquet file.
        split: any split of ``pid_splits.json`` (``train``, ``val``, ``test``, ``minitest``...).
        options: how prompts and targets are written (:class:`~pill.data.prompts.PromptOptions`;
            default QCM-A). ``prompt_format="QCM-ALE"``, ``use_caption`` and ``system_prompt``
            override its fields. ``prompt_style`` (``pill`` / ``reference``) switches the
            options to that style (:meth:`~pill.data.prompts.PromptOptions.for_style`).
        captions: the captions file for ``use_caption`` (default ``captions.json`` under root).
        skip_bad: skip malformed problems (counted per reason in ``.report``) instead of raising.
        check_images: decode every image now (catches corrupt, truncated and oversized
            files at load time); with False only the files' existence is checked.
        limit: keep only the first ``limit`` problems of the split (debugging).
        allow_outside_root: accept image paths that resolve (through ``../`` in a qid or image
            name, an absolute name or a symlink) outside ``root``; by default such a problem is
            refused before its file is opened (reason ``outside_root``).
    Returns a :class:`SampleList`; ``meta`` holds qid, answer, target_answer, choices,
    has_image, subject, grade, topic, category, format and the raw problem. The random wrong
    answer of training is drawn per epoch by :func:`wrong_answer_variant`.
    Raises DataError naming the file and problem id (unless ``skip_bad``).
    """
    opts = _prompt_options(options, prompt_format, use_caption, system_prompt)
    if prompt_style is not None:
        opts = opts.for_style(prompt_style)
    source = _Source.open(root, allow_outside_root)
    qids = load_split(source.root, split, problems=source.problems)[:limit]
    caption_map = _caption_map(source.root, captions) if opts.use_caption else {}
    report = LoadReport(source=f"{source.name} [{split}]")
    samples = SampleList(report=report)

    from tqdm.auto import tqdm

    for qid in tqdm(qids, desc=f"ScienceQA {split}", disable=None if progress else True, leave=False):
        report.total += 1
        try:
            samples.append(_problem_sample(source, str(qid), split, opts, caption_map, check_images, max_pixels))
        except BadSample as e:
            if not skip_bad:
                raise
            report.skip(e.reason, str(e))
    report.kept = len(samples)
    report.counts = _counts(samples, caption_map)
    report.print_if_skipped()
    return samples


def _prompt_options(options: Optional[PromptOptions], prompt_format: Optional[str], use_caption: Optional[bool],
                    system_prompt: Optional[str]) -> PromptOptions:
    opts = options or PromptOptions()
    if prompt_format is not None:
        input_format, output_format = parse_format(prompt_format)
        opts = replace(opts, input_format=input_format, output_format=output_format)
    if use_caption is not None:
        opts = replace(opts, use_caption=use_caption)
    if system_prompt is not None:
        opts = replace(opts, system_prompt=system_prompt)
    return opts


@dataclass
class _Source:
    """The problems of a ScienceQA root and where their images are."""

    root: Path
    official: bool
    problems: dict[str, dict]
    image_bytes: dict[str, Optional[bytes]]  # parquet export: qid -> encoded image
    allow_outside_root: bool = False  # accept image paths that resolve outside root

    @classmethod
    def open(cls, root: PathLike, allow_outside_root: bool = False) -> "_Source":
        root = Path(root)
        _check_root(root)
        if _is_official(root):
            return cls(root, True, load_problems(root), {}, allow_outside_root)
        return cls(root, False, *_read_parquet(_parquet_files(root)), allow_outside_root)

    @property
    def name(self) -> str:
        return str(self.root / "problems.json") if self.official else str(self.root)

    def images(self, qid: str, problem: dict, split: str) -> list:
        """``[path or bytes]`` of the problem's image, ``[]`` without one; BadSample when it is missing."""
        if not problem.get("image"):
            return []
        if not self.official:
            return [self.image_bytes[qid]]
        path, tried = image_path(self.root, qid, problem, split, allow_outside_root=self.allow_outside_root,
                                 where=f"{self.name}: problem {qid}")
        if not os.path.exists(path):
            raise BadSample(f"{self.name}: problem {qid}: image file not found (tried {', '.join(tried)})",
                            "missing_image")
        return [path]

    def media(self, qid: str, problem: dict, split: str) -> dict[str, list[str]]:
        """The problem's inputs of the other modalities (``audio``: [path, ...]), checked to exist."""
        out = {}
        for m in _other_modalities():
            if not problem.get(m.json_field):
                continue
            if not self.official:
                raise BadSample(f"{self.name}: problem {qid}: {m.label} files are read from the official "
                                "layout only, not from parquet", "bad_field")
            paths = input_paths(self.root, qid, problem, split, m.json_field)
            for p in paths:
                check_input_file(p, m.name, qid, self.name, kind="problem")
            out[m.name] = paths
        return out


def _caption_map(root: Path, captions: Optional[PathLike]) -> dict[str, str]:
    path = Path(captions) if captions is not None else root / "captions.json"
    if not path.is_file():
        raise DataError(f"{path}: captions file not found (use_caption=True needs it)")
    return load_captions(path)


def _problem_sample(source: _Source, qid: str, split: str, opts: PromptOptions, caption_map: dict[str, str],
                    check_images: bool, max_pixels: Optional[int]) -> Sample:
    """One problem as a Sample; BadSample (with its reason) when the problem or its image is unusable."""
    if qid not in source.problems:
        raise BadSample(f"{source.root / 'pid_splits.json'}: problem {qid} of split {split!r} "
                        f"is not in problems.json", "unknown_qid")
    problem = source.problems[qid]
    validate_problem(problem, qid, source.name, opts.input_format[2:] + opts.output_format)
    images = source.images(qid, problem, split)
    if images:
        check_image(images[0], qid, source.name, decode=check_images, max_pixels=max_pixels, kind="problem")
    media = source.media(qid, problem, split)
    placeholders = [m.placeholder for m in _other_modalities() for _ in media.get(m.name, [])]
    caption = caption_map.get(qid, "") if opts.use_caption else None
    messages = scienceqa_messages(problem, opts.input_format, opts.output_format, has_image=bool(images),
                                  caption=caption, system_prompt=opts.system_prompt, style=opts.style,
                                  placeholders=placeholders, **opts.text_options)
    sample = Sample(id=qid, messages=messages, images=images, media=media, meta={
        "source": "scienceqa",
        "qid": qid,
        "split": problem.get("split", split),
        "answer": problem["answer"],
        "target_answer": problem["answer"],
        "choices": list(problem["choices"]),
        "has_image": bool(images),
        **{f"has_{m.name}": bool(media.get(m.name)) for m in _other_modalities()},
        "has_hint": bool(problem.get("hint")),
        "subject": problem.get("subject"),
        "grade": problem.get("grade"),
        "topic": problem.get("topic"),
        "category": problem.get("category"),
        "format": opts.format,
        "text_options": opts.text_options,
        "problem": problem,
        **({"template": style_template(opts.style)} if opts.style != "pill" else {}),
    })
    check_placeholders(sample, source.name, kind="problem")
    return sample


def _counts(samples: list[Sample], caption_map: dict[str, str]) -> dict[str, int]:
    others = {f"with_{m.name}": sum(bool(s.media.get(m.name)) for s in samples) for m in _other_modalities()}
    return {"with_image": sum(s.meta["has_image"] for s in samples), **{k: v for k, v in others.items() if v},
            "with_hint": sum(s.meta["has_hint"] for s in samples),
            "with_caption": sum(bool(caption_map.get(s.id)) for s in samples)}


def scienceqa_stats(root: PathLike, split: str, allow_outside_root: bool = False) -> dict[str, int]:
    """Counts over one split without loading images: problems, with_image, with_hint,
    no_context (neither), missing_image_files, unknown_qids, invalid (malformed problems, and
    image paths outside ``root`` unless ``allow_outside_root``)."""
    root = Path(root)
    problems = load_problems(root)
    qids = load_split(root, split, problems=problems)
    official = _is_official(root)
    stats = {"problems": len(qids), "with_image": 0, "with_hint": 0, "no_context": 0,
             "missing_image_files": 0, "unknown_qids": 0, "invalid": 0}
    for qid in qids:
        problem = problems.get(str(qid))
        if problem is None:
            stats["unknown_qids"] += 1
            continue
        try:
            validate_problem(problem, str(qid), str(root))
            path = image_path(root, str(qid), problem, split, allow_outside_root=allow_outside_root)[0] \
                if official and problem.get("image") else None
        except BadSample:  # malformed, or an image path outside the root
            stats["invalid"] += 1
            continue
        has_image, has_hint = bool(problem.get("image")), bool(problem.get("hint"))
        stats["with_image"] += has_image
        stats["with_hint"] += has_hint
        stats["no_context"] += not (has_image or has_hint)
        if path is not None and not os.path.exists(path):
            stats["missing_image_files"] += 1
    return stats
