"""Figures: training curves from ``metrics.jsonl`` and per-layer gate strength (paper Fig. 4).

Figures are drawn on matplotlib's Agg canvas through the object API, so importing
this module never changes the pyplot backend of the caller's session.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pill.errors import DataError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` that carry a loss, in file order.

    Each non-blank line must be a JSON object with a numeric ``step``; ``loss`` and
    ``lr`` must be numbers where present; ``stage`` is optional. Lines without a
    ``loss`` (e.g. evaluation events) are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found (training writes RUN/metrics.jsonl)")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            if not _is_number(record.get("step")):
                raise DataError(f"{path}, line {lineno}: 'step' must be a number, got {record.get('step')!r}")
            for field in ("loss", "lr"):
                if field in record and not _is_number(record[field]):
                    raise DataError(f"{path}, line {lineno}: {field!r} must be a number, got {record[field]!r}")
            if "loss" in record:
                records.append(record)
    if not records:
        raise DataError(f"{path}: no line has a 'loss'")
    return records


def _save(fig: Figure, out_path: str | Path) -> Path:
    import io

    from ..io import write_atomic

    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        write_atomic(out_path, buf.getvalue())
    except OSError as e:
        raise DataError(f"{out_path}: cannot write the figure ({e.strerror or e})") from None
    return out_path


def plot_training(records: Sequence[Mapping[str, Any]], out_path: str | Path, title: str | None = None) -> Path:
    """Loss (top) and learning rate (bottom) against step, one line per stage.

    Args:
        records: dicts with ``step`` and ``loss``, optionally ``lr`` and ``stage``
            (as returned by ``read_metrics``).
        out_path: PNG file to write; parent folders are created.
        title: figure title.

    Returns:
        ``out_path`` as a ``Path``.
    """
    if not records:
        raise DataError("no training records to plot")
    stages: dict[str, list[Mapping[str, Any]]] = {}
    for i, record in enumerate(records):
        if not _is_number(record.get("step")) or not _is_number(record.get("loss")):
            raise DataError(f"record {i} needs numeric 'step' and 'loss', got {dict(record)!r}")
        stages.setdefault(str(record.get("stage", "train")), []).append(record)

    fig = Figure(figsize=(8, 6))
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True)
    for stage, rows in stages.items():
        ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=stage)
        with_lr = [r for r in rows if _is_number(r.get("lr"))]
        ax_lr.plot([r["step"] for r in with_lr], [r["lr"] for r in with_lr], label=stage)
    ax_loss.set_ylabel("loss")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend(title="stage")
    fig.suptitle(title or "Training")
    fig.tight_layout()
    return _save(fig, out_path)


def read_gates(path: str | Path) -> tuple[list[int], list[float], str | None]:
    """``gates.json`` -> (layer indices, mean |tanh(gate)| per layer, gate variant).

    Format: ``{"layers": [0, 1, ...], "mean_abs_gate": [...], "variant": "token"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: gate values not found; the model writes RUN/gates.json "
            '({"layers": [...], "mean_abs_gate": [...], "variant": "token"})'
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object with 'layers' and 'mean_abs_gate'")
    values = data.get("mean_abs_gate")
    if not isinstance(values, list) or not values or not all(_is_number(v) for v in values):
        raise DataError(f"{path}: 'mean_abs_gate' must be a non-empty list of numbers")
    bad = next((i for i, v in enumerate(values) if not (math.isfinite(v) and 0.0 <= v <= 1.0)), None)
    if bad is not None:
        raise DataError(f"{path}: 'mean_abs_gate' of layer {bad} is {values[bad]!r}, expected a number in [0, 1]")
    layers = data.get("layers", list(range(len(values))))
    if not isinstance(layers, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise DataError(f"{path}: 'layers' must be a list of layer indices")
    if len(layers) != len(values):
        raise DataError(f"{path}: 'layers' has {len(layers)} entries but 'mean_abs_gate' has {len(values)}")
    variant = data.get("variant")
    return layers, [float(v) for v in values], None if variant is None else str(variant)


def plot_gates(
    values: Mapping[str, Sequence[float]] | Sequence[float],
    out_path: str | Path,
    title: str | None = None,
    *,
    layers: Sequence[int] | None = None,
) -> Path:
    """Mean |tanh(gate)| per layer (the paper's Figure 4).

    Args:
        values: per-layer values in [0, 1], shape (L,); or label -> per-layer values
            to compare several runs or gate variants (all of the same length L).
        out_path: PNG file to write; parent folders are created.
        title: figure title.
        layers: x positions (layer indices) of the L values; default 0..L-1.

    Returns:
        ``out_path`` as a ``Path``. One series is drawn as bars, several as lines.
    """
    series = dict(values) if isinstance(values, Mapping) else {"": values}
    if not series:
        raise DataError("no gate values to plot")
    lengths = {len(v) for v in series.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise DataError(f"every series needs the same, non-zero number of layers; got lengths {sorted(lengths)}")
    (num_layers,) = lengths
    for label, vals in series.items():
        for i, v in enumerate(vals):
            if not _is_number(v) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                name = f"series {label!r}, " if label else ""
                raise DataError(f"{name}layer {i}: mean |tanh(gate)| must be a number in [0, 1], got {v!r}")
    x = list(range(num_layers)) if layers is None else list(layers)
    if len(x) != num_layers:
        raise DataError(f"layers has {len(x)} entries for {num_layers} values")

    fig = Figure(figsize=(max(6.0, 0.3 * num_layers + 2), 4))
    ax = fig.subplots()
    if len(series) == 1:
        ((label, vals),) = series.items()
        ax.bar(x, list(vals), color="tab:blue", label=label or None)
    else:
        for label, vals in series.items():
            ax.plot(x, list(vals), marker="o", label=label)
        ax.legend()
    ax.set_xlabel("layer index")
    ax.set_ylabel("mean |tanh(gate)|")
    ax.set_ylim(0, max(0.05, 1.1 * max(max(v) for v in series.values())))
    if num_layers <= 40:
        ax.set_xticks(x)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "Gate strength per layer")
    fig.tight_layout()
    return _save(fig, out_path)
