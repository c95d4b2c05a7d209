"""``pill demo``: the whole method on this machine, end to end, on the embedded default models.

1. write the built-in image-grounded benchmark (cached after the first run);
2. score the untrained plugged model on its test split (its image pathway has learned nothing);
3. stage 1 (align on captions), then stage 2 (fine-tune on the questions);
4. score the trained model on the same test split;
5. print a before/after table per question type and write ``report.json``, ``gates.png`` and
   ``loss.png`` into the run directory.

``modality="audio"`` (``pill demo --modality audio``) runs the same steps on the built-in audio
benchmark (:mod:`pill.data.synth_audio`) with the embedded Whisper-base as the audio encoder; its
gate plot shows the audio tokens' gates beside the image tokens' of an image demo run next to it
(``<out>/../demo``), when there is one. ``modality="image+audio"`` trains one model on both
benchmarks, joined into one (:func:`pill.data.combine.combine_benchmarks`: problem ids ``i...`` and
``a...``), with as many steps as the two single-modality demos together, and reports each
benchmark's accuracy and each modality's gates.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .io import write_atomic

CONFIGS = Path(__file__).resolve().parent / "configs" / "demo"


# The demo trains the same way in both precisions. A float32 step costs about twice a bf16 step on a
# CPU with native bf16 (all of it in the frozen LLM's matrix products), so in float32 the demo takes
# about twice as long; halving the steps instead to stay within 15 minutes cost far more accuracy
# (README, "Quick start": 46% instead of 65% on a 2-core CPU without bf16).
FLOAT32_NOTE = ("this CPU trains in float32, slower than with native bf16: expect about 19-21 minutes on 2 cores "
                "with AVX-512, 25-30 with AVX2 only, instead of about 14")


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    n_train: int = 2000
    n_test: int = 200
    seed: int = 0
    align_steps: int = 220
    finetune_steps: int = 160
    batch_size: int = 8
    eval_batch_size: int = 50  # 4 batches for the 200 test problems, 25 % faster than 16 per batch
    eval_mode: str = "generate"
    max_new_tokens: int = 56  # the description, the fact and "The answer is A.": 44 tokens at most
    pool: Optional[int] = 4
    audio_pool: Optional[int] = None  # audio: Whisper frames per token (None: the config's, 4)
    # auto: bf16 autocast where the CPU has native bf16 (about 1.4x faster), else float32 (pill.precision)
    precision: str = "auto"
    quick: bool = False
    modality: str = "image"  # or "audio": the audio benchmark and the Whisper encoder; or "image+audio"
    # config overrides (``key=value``, as ``pill train --set``) for both stages, or one stage with
    # ``align:key=value`` / ``finetune:key=value``; applied after the demo's own settings
    overrides: tuple[str, ...] = ()


MODALITIES = ("image", "audio", "image+audio")
# the shipped demo configs of each modality: configs/demo/stage{1,2}_<kind>.yaml
_CONFIG_KIND = {"image": "synth", "audio": "audio", "image+audio": "image_audio"}
# problem-id prefixes of the benchmarks joined by image+audio
SOURCES = {"i": "image", "a": "audio"}


def _synth(root: Path, st: DemoSettings) -> Path:
    if st.modality == "image+audio":
        from dataclasses import replace

        from .data.combine import combine_benchmarks

        parts = {prefix: _synth(root.parent / f"data-{name}", replace(st, modality=name))
                 for prefix, name in SOURCES.items()}
        info = combine_benchmarks(parts, root)
        print(f"benchmark: joined {', '.join(str(p) for p in parts.values())} into {root} ({info['splits']})")
        return root
    if st.modality == "audio":
        from .data.synth_audio import GENERATOR_VERSION, make_synth_audio as make_synth
    else:
        from .data.synth import GENERATOR_VERSION, make_synth

    info = root / "synth_info.json"
    if info.is_file():
        old = json.loads(info.read_text())
        generator = "pill.data.synth_audio" if st.modality == "audio" else "pill.data.synth"
        splits = old.get("splits", {})
        if (old.get("generator"), old.get("version"), old.get("seed"), splits.get("train"), splits.get("test")) == \
                (generator, GENERATOR_VERSION, st.seed, st.n_train, st.n_test):
            print(f"benchmark: reusing {root}")
            return root
    print(f"benchmark: writing {st.n_train} training and {st.n_test} test problems to {root}")
    make_synth(root, n_train=st.n_train, n_test=st.n_test, seed=st.seed)
    return root


def _per_category(result: dict, problems: dict, field: str = "category") -> dict[str, float]:
    right: dict[str, list[int]] = {}
    for qid, pred in result["predictions"].items():
        cat = problems[qid].get(field, "all")
        cat = SOURCES.get(cat, cat) if field == "source" else cat
        right.setdefault(cat, []).append(int(pred == problems[qid]["answer"]))
    return {c: sum(v) / len(v) for c, v in sorted(right.items())}


def resolve_settings(st: DemoSettings):
    """The training precision and the checked settings the demo runs with."""
    from .errors import ConfigError
    from .precision import resolve_precision

    for name in ("n_train", "n_test", "align_steps", "finetune_steps", "batch_size", "eval_batch_size",
                 "max_new_tokens"):
        if getattr(st, name) < 1:
            raise ConfigError(f"demo {name}: must be >= 1, got {getattr(st, name)}")
    if st.modality not in MODALITIES:
        raise ConfigError(f"demo modality: one of {', '.join(MODALITIES)}, got {st.modality!r}")
    stage_overrides(st, "align")  # a bad stage prefix fails here, before any work
    return resolve_precision(st.precision), st


def stage_overrides(st: DemoSettings, stage: str) -> list[str]:
    """The ``--set`` overrides of ``st`` that apply to ``stage`` (``align`` or ``finetune``), prefix removed."""
    from .errors import ConfigError

    picked = []
    for item in st.overrides:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head:
            if head not in ("align", "finetune"):
                raise ConfigError(f"demo --set {item!r}: a stage prefix is align: or finetune:, got {head}:")
            if head == stage:
                picked.append(rest)
        else:
            picked.append(item)
    return picked


def stage_config(st: DemoSettings, precision, data: Path, out: Path, stage: str):
    """The validated config of one demo stage: the shipped demo YAML with this run's settings."""
    from .runconfig import load_config

    kind = _CONFIG_KIND[st.modality]
    name = f"stage1_{kind}.yaml" if stage == "align" else f"stage2_{kind}.yaml"
    steps = st.align_steps if stage == "align" else st.finetune_steps
    overrides = [f"train.seed={st.seed}", f"optim.max_steps={steps}", f"optim.batch_size={st.batch_size}",
                 f"optim.micro_batch_size={st.batch_size}", f"train.mixed_precision={precision.mixed_precision}"]
    if st.modality != "audio":
        overrides.append(f"model.pool={'null' if st.pool is None else st.pool}")
    if st.audio_pool is not None and st.modality != "image":
        overrides.append(f"model.encoders.audio.pool={st.audio_pool}")
    # what the captions' paths are relative to
    folder = {"audio": data / "audio", "image": data / "images", "image+audio": data}[st.modality]
    if stage == "align":
        overrides += [f"data.json={data / 'captions_llava.json'}", f"data.image_folder={folder}"]
    else:
        overrides += [f"data.root={data}", f"init_from={out / 'align'}"]
    overrides += stage_overrides(st, stage)
    cfg = load_config(CONFIGS / name, overrides)
    if cfg.data.mix_llava_json:  # a demo config that mixes the captions in
        cfg.data.mix_llava_json = str(data / "captions_llava.json")
        cfg.data.mix_image_folder = str(data / "images")
    return cfg


def run_demo(st: DemoSettings) -> dict:
    """Run the demo; returns the report written to ``<out>/report.json``."""
    import torch

    from .build import build_vlm
    from .data.scienceqa import load_problems

    t0 = time.time()
    precision, st = resolve_settings(st)
    print(f"precision: {precision.describe()}")
    if precision.name == "float32" and not st.quick:
        print(f"note: {FLOAT32_NOTE}")
    out = Path(st.out)
    out.mkdir(parents=True, exist_ok=True)
    data = _synth(out / "data", st)
    timings: dict[str, float] = {}

    torch.manual_seed(st.seed)
    t = time.time()
    cfg2 = stage_config(st, precision, data, out, "finetune")
    vlm = build_vlm(cfg2)
    vlm.system_prompt = cfg2.data.system_prompt  # as in training
    timings["load_models"] = time.time() - t

    print(f"\n== 1/4 the untrained plugged model on the test split (its {st.modality} pathway has learned nothing "
          "yet)")
    before = _evaluate(vlm, st, data, out, cfg2.data.prompt_format, "before", timings)
    runs = _train_stages(vlm, st, precision, data, out, timings)
    print("\n== 4/4 the trained model on the same test split")
    after = _evaluate(vlm, st, data, out, cfg2.data.prompt_format, "after", timings)
    _figures(vlm, st, data, out, cfg2.data.prompt_format, runs)

    problems = load_problems(data)
    report = {
        "accuracy_before": before["Avg"] / 100, "accuracy_after": after["Avg"] / 100,
        "per_type_before": _per_category(before, problems), "per_type_after": _per_category(after, problems),
        **({"per_benchmark_before": _per_category(before, problems, "source"),
            "per_benchmark_after": _per_category(after, problems, "source")} if st.modality == "image+audio" else {}),
        "chance": _chance(problems, before["predictions"]),
        "test_problems": after["count"], "eval_mode": st.eval_mode,
        "wall_seconds": time.time() - t0, "timings_seconds": timings,
        "modality": st.modality,
        "settings": st.__dict__, "precision": {"name": precision.name, "reason": precision.reason},
        "trainable_parameters": vlm.num_trainable(),
        "runs": {k: str(v) for k, v in runs.items()},
        "files": {"gates_plot": str(out / "gates.png"), "loss_plot": str(out / "loss.png"),
                  "eval_before": str(out / "eval-before"), "eval_after": str(out / "eval-after")},
    }
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    print(format_report(report))
    return report


def _evaluate(vlm, st: DemoSettings, data: Path, out: Path, fmt: str, tag: str, timings: dict) -> dict:
    from .eval.evaluate import evaluate_scienceqa

    t = time.time()
    res = evaluate_scienceqa(vlm, data, "test", prompt_format=fmt, batch_size=st.eval_batch_size,
                             mode=st.eval_mode, out_dir=out / f"eval-{tag}",
                             max_new_tokens=st.max_new_tokens if st.eval_mode == "generate" else None)
    timings[f"eval_{tag}"] = time.time() - t
    return res


def _train_stages(vlm, st: DemoSettings, precision, data: Path, out: Path, timings: dict) -> dict[str, Path]:
    """Stage 1 then stage 2 on ``vlm``, each into a fresh run directory under ``out``."""
    import shutil

    from .train.loop import train

    runs = {}
    for n, stage in enumerate(("align", "finetune"), start=2):
        cfg = stage_config(st, precision, data, out, stage)
        print(f"\n== {n}/4 stage {stage}: {cfg.optim.max_steps} steps")
        run_dir = out / stage
        if (run_dir / "pill.safetensors").exists() or (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir)
        t = time.time()
        train(cfg, run_dir, vlm=vlm)
        timings[f"train_{stage}"] = time.time() - t
        runs[stage] = run_dir
    return runs


def measure_gates_on(vlm, samples) -> dict:
    """:meth:`pill.vlm.PillVLM.measure_gates` on the prompts of ``samples`` (one batch, padded left)."""
    from .data.collate import Collator, prompt_items

    batch = Collator(vlm.processor, padding_side="left")(prompt_items(samples, vlm.processor))
    keys = {"input_ids", "attention_mask", "modality_ids"} | {m.inputs_key for m in vlm.modalities.values()}
    return vlm.measure_gates(**{k: v for k, v in batch.items() if k in keys})


def _figures(vlm, st: DemoSettings, data: Path, out: Path, fmt: str, runs: dict[str, Path]) -> None:
    """The gates (the paper's Figure 4) on a sample batch of test inputs (audio: beside an image demo's
    gates when ``<out>/../demo`` holds one; image+audio: each modality on its own benchmark's
    problems); the loss curves of both stages."""
    from .data.scienceqa import load_scienceqa
    from .eval.plots import plot_gates, plot_training, read_metrics

    if st.modality == "image+audio":  # each modality's gates on 16 test problems of its own benchmark
        test = load_scienceqa(data, "test", prompt_format=fmt, progress=False, system_prompt=vlm.system_prompt)
        per = {name: measure_gates_on(vlm, [x for x in test if x.id.startswith(prefix)][:16]) for prefix, name in SOURCES.items()}
        gates = {**per["image"], "by_modality": per}
        series = {f"{name} tokens": g["mean_abs_gate"] for name, g in per.items()}
    else:
        gates = measure_gates_on(vlm, load_scienceqa(data, "test", prompt_format=fmt, limit=16, progress=False,
                                                 system_prompt=vlm.system_prompt))
        series = {f"{st.modality} tokens": gates["mean_abs_gate"]}
        image_run = out.parent / "demo" / "finetune" / "gates.json"
        if st.modality == "audio" and image_run.is_file():
            image = json.loads(image_run.read_text())
            if image.get("layers") == gates["layers"]:
                series = {"audio tokens (this run)": gates["mean_abs_gate"],
                          f"image tokens ({image_run.parent.parent})": image["mean_abs_gate"]}
    write_atomic(runs["finetune"] / "gates.json", json.dumps(gates))
    plot_gates(series if len(series) > 1 else gates["mean_abs_gate"], out / "gates.png", layers=gates["layers"],
               title=f"mean |tanh(gate)| of {' and '.join(k.split()[0] for k in series)} tokens per layer (stage 2)")
    records = read_metrics(runs["align"] / "metrics.jsonl") + [
        {**r, "step": r["step"] + st.align_steps} for r in read_metrics(runs["finetune"] / "metrics.jsonl")]
    plot_training(records, out / "loss.png", title="pill demo: stage 1 (align) then stage 2 (fine-tune)")


def _chance(problems: dict, predictions: dict) -> float:
    return sum(1 / len(problems[q]["choices"]) for q in predictions) / max(1, len(predictions))


def format_report(r: dict) -> str:
    lines = ["", f"| question type | before | after |", "|---|---:|---:|"]
    for cat in r["per_type_after"]:
        lines.append(f"| {cat} | {100 * r['per_type_before'].get(cat, 0):.1f}% | {100 * r['per_type_after'][cat]:.1f}% |")
    for name, acc in r.get("per_benchmark_after", {}).items():
        lines.append(f"| *{name} benchmark* | *{100 * r['per_benchmark_before'].get(name, 0):.1f}%* | "
                     f"*{100 * acc:.1f}%* |")
    lines.append(f"| **all ({r['test_problems']} problems; chance {100 * r['chance']:.1f}%)** | "
                 f"**{100 * r['accuracy_before']:.1f}%** | **{100 * r['accuracy_after']:.1f}%** |")
    lines += ["", f"wall time {r['wall_seconds'] / 60:.1f} min; report: {Path(r['files']['gates_plot']).parent / 'report.json'}",
              f"gate plot: {r['files']['gates_plot']}", f"loss plot: {r['files']['loss_plot']}"]
    return "\n".join(lines)
