"""LLaVA-format JSON: CC595K caption data (``chat.json``) and LLaVA-1.5 665k instructions.

A file is a list of records (``.jsonl``: one record per line)::

    {"id": "...", "image": "relative/path.jpg",          # optional; a list for several images
     "conversations": [{"from": "human", "value": "<image>\\nDescribe it."},
                       {"from": "gpt", "value": "A cat."}, ...]}

``human`` becomes ``user``, ``gpt`` becomes ``assistant`` (``system`` stays). The
``<image>`` placeholders are kept where they are; records without an image are
text-only samples.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import DataError
from ..modalities import modalities
from .prompts import style_template
from . import (BadSample, LoadReport, Sample, SampleList, check_image, check_input_file, check_placeholders,
               inside_root, read_json)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _read_records(path: Path) -> list:
    if path.suffix == ".jsonl":
        records = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise DataError(f"{path}: LLaVA JSON file not found") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: malformed JSON at line {n}, column {e.colno}: {e.msg}") from None
        return records
    data = read_json(path, "LLaVA JSON")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got {type(data).__name__}")
    return data


def record_to_sample(record: Any, index: int, image_folder: Union[str, os.PathLike], source: str,
                     system_prompt: Optional[str] = None, allow_outside_root: bool = False,
                     prompt_style: str = "pill") -> Sample:
    """One LLaVA record -> Sample; raises BadSample (missing_field, bad_field, no_answer, placeholder_mismatch,
    outside_root: an input path that resolves outside ``image_folder``, unless ``allow_outside_root``).
    ``prompt_style="reference"``: the sample renders with the reference code's template
    (``meta["template"]``, :data:`pill.data.prompts.REFERENCE_TEMPLATE`)."""
    if not isinstance(record, dict):
        raise BadSample(f"{source}: record {index}: expected an object, got {type(record).__name__}", "bad_field")
    sid = str(record.get("id", f"#{index}"))
    where = f"{source}: sample {sid}"
    convs = record.get("conversations")
    if convs is None:
        raise BadSample(f"{where}: missing required field 'conversations'", "missing_field")
    if not isinstance(convs, list) or not convs:
        raise BadSample(f"{where}: 'conversations' must be a non-empty list", "bad_field")
    own_system = isinstance(convs[0], dict) and ROLES.get(convs[0].get("from")) == "system"
    # a record's own system turn wins over the configured one
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None and not own_system else []
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadSample(f"{where}: turn {t} needs 'from' and 'value'", "missing_field")
        role = ROLES.get(turn["from"])
        if role is None:
            raise BadSample(f"{where}: turn {t} has unknown speaker {turn['from']!r} "
                            f"(expected one of {', '.join(ROLES)})", "bad_field")
        if not isinstance(turn["value"], str):
            raise BadSample(f"{where}: turn {t} 'value' must be a string", "bad_field")
        messages.append({"role": role, "content": turn["value"]})
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is None or first["role"] != "user":
        raise BadSample(f"{where}: the conversation must start with a human turn", "bad_field")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadSample(f"{where}: no gpt turn to learn from", "no_answer")
    inputs = {}
    for m in modalities():  # "image": ..., and the fields of other registered modalities ("audio": [...])
        value = record.get(m.json_field)
        names = [] if value in (None, "") else [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise BadSample(f"{where}: {m.json_field!r} must be a path or a list of paths", "bad_field")
        if names:
            inputs[m.name] = [inside_root(image_folder, n, what=m.label, where=where, root_name="the image folder",
                                          allow_outside=allow_outside_root) for n in names]
    meta = {"source": "llava", "index": index}
    template = style_template(prompt_style)
    if template is not None:
        meta["template"] = template
    sample = Sample(id=sid, messages=messages, meta=meta).with_inputs(inputs)
    check_placeholders(sample, source)
    return sample


def load_llava(json_path: Union[str, os.PathLike], image_folder: Union[str, os.PathLike], *, skip_bad: bool = False,
               check_images: bool = False, max_pixels: Optional[int] = None, system_prompt: Optional[str] = None,
               limit: Optional[int] = None, progress: bool = True, allow_outside_root: bool = False,
               prompt_style: str = "pill") -> SampleList:
    """Load a LLaVA JSON/JSONL file.

    Args:
        image_folder: the folder the records' ``image`` paths are relative to.
        skip_bad: skip malformed records (counted per reason in ``.report``) instead of raising.
        check_images: decode every image now; by default only their existence is checked
            (decoding 600k images takes long; a bad image still fails, naming the file and
            sample, when the collator loads it).
        allow_outside_root: accept input paths that resolve (through ``../``, an absolute path or a
            symlink) outside ``image_folder``; by default such a sample is refused before its file
            is opened (reason ``outside_root``).
    Returns a :class:`SampleList` (``report.counts``: with_image, text_only, multi_turn).
    """
    path = Path(json_path)
    records = _read_records(path)
    if limit is not None:
        records = records[:limit]
    source = str(path)
    report = LoadReport(source=source)
    counts = {"with_image": 0, "text_only": 0, "multi_turn": 0}
    samples = SampleList(report=report)

    from tqdm.auto import tqdm

    for index, record in enumerate(tqdm(records, desc=path.name, disable=None if progress else True, leave=False)):
        report.total += 1
        try:
            sample = record_to_sample(record, index, image_folder, source, system_prompt, allow_outside_root,
                                      prompt_style)
            for img in sample.images:
                check_image(img, sample.id, source, decode=check_images, max_pixels=max_pixels)
            for name, refs in sample.media.items():
                for ref in refs:
                    check_input_file(ref, name, sample.id, source)
        except BadSample as e:
            if not skip_bad:
                raise
            report.skip(e.reason, str(e))
            continue
        counts["with_image" if sample.images else "text_only"] += 1
        counts["multi_turn"] += sum(m["role"] == "assistant" for m in sample.messages) > 1
        samples.append(sample)
    report.kept = len(samples)
    report.counts = counts
    report.print_if_skipped()
    return samples
