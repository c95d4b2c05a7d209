"""Join benchmarks in the ScienceQA layout into one, for a model that trains on all of them.

:func:`combine_benchmarks` takes several roots (the built-in image and audio benchmarks, say), gives
each problem id a prefix per source (``i12``, ``a12``) so that none collide, and writes one root:
``problems.json`` (each problem keeps its fields and gains ``source``), ``pid_splits.json``,
``captions.json``, ``captions_llava.json`` (input paths relative to the new root) and the input
files under ``images/<split>/<qid>/`` and ``audio/<split>/<qid>/``. Files are hard-linked where the
file system allows it, else copied; never symlinked, since the loaders refuse paths that resolve
outside the root. A missing file or a malformed source is an error that names it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Union

from ..errors import DataError
from ..io import write_atomic

PathLike = Union[str, os.PathLike]
# where each problem field's files live in the ScienceQA layout
_FIELDS = {"image": "images", "audio": "audio"}


def _read_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: not found (is {path.parent} a benchmark in the ScienceQA layout?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _link(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise DataError(f"{src}: file not found")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _files(root: Path, qid: str, problem: dict) -> list[tuple[str, Path]]:
    """(folder, file) of every input a problem names, in its own split's folder."""
    out = []
    for field, folder in _FIELDS.items():
        value = problem.get(field)
        names = [] if not value else [value] if isinstance(value, str) else list(value)
        for name in names:
            out.append((folder, root / folder / problem["split"] / qid / name))
    return out


def combine_benchmarks(sources: Mapping[str, PathLike], out_dir: PathLike) -> dict:
    """Write the benchmarks ``sources`` (id prefix -> root) as one root ``out_dir``; returns its summary
    (problems per source and split), also written to ``combined_info.json``."""
    out = Path(out_dir)
    problems: dict[str, dict] = {}
    splits: dict[str, list[str]] = {}
    captions: dict[str, str] = {}
    llava: list[dict] = []
    summary: dict[str, dict] = {}
    for prefix, root in sources.items():
        root = Path(root)
        src_problems = _read_json(root / "problems.json")
        src_splits = _read_json(root / "pid_splits.json")
        src_captions = _read_json(root / "captions.json") if (root / "captions.json").is_file() else {}
        summary[prefix] = {"root": str(root), "splits": {}}
        for split, qids in src_splits.items():
            summary[prefix]["splits"][split] = len(qids)
            for qid in qids:
                if qid not in src_problems:
                    raise DataError(f"{root / 'pid_splits.json'}: problem {qid} of split {split} is not in problems.json")
                p = dict(src_problems[qid])
                p.setdefault("split", split)
                new = f"{prefix}{qid}"
                for folder, f in _files(root, qid, p):
                    _link(f, out / folder / p["split"] / new / f.name)
                problems[new] = {**p, "source": prefix}
                splits.setdefault(split, []).append(new)
                if qid in src_captions:
                    captions[new] = src_captions[qid]
        llava_path = root / "captions_llava.json"
        if llava_path.is_file():
            for rec in _read_json(llava_path):
                qid = str(rec.get("id"))
                if qid not in src_problems:
                    raise DataError(f"{llava_path}: record {qid} names no problem of {root / 'problems.json'}")
                p = src_problems[qid]
                rec = {**rec, "id": f"{prefix}{qid}"}
                for field, folder in _FIELDS.items():
                    if rec.get(field):
                        names = [rec[field]] if isinstance(rec[field], str) else rec[field]
                        moved = [f"{folder}/{p.get('split', 'train')}/{prefix}{qid}/{Path(n).name}" for n in names]
                        rec[field] = moved[0] if isinstance(rec[field], str) else moved
                llava.append(rec)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "problems.json", json.dumps(problems))
    write_atomic(out / "pid_splits.json", json.dumps(splits))
    write_atomic(out / "captions.json", json.dumps(captions))
    write_atomic(out / "captions_llava.json", json.dumps(llava))
    info = {"sources": summary, "splits": {s: len(q) for s, q in splits.items()}}
    write_atomic(out / "combined_info.json", json.dumps(info, indent=2))
    return info


__all__ = ["combine_benchmarks"]
