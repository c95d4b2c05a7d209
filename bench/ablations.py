"""The paper's ablations (Table 3) and the baselines a user would pick, on the built-in image benchmark.

    python bench/ablations.py [--seeds 0 1] [--align-steps 160] [--finetune-steps 110]
                              [--only full,lora_lr1e-3] [--out runs/ablations]

Every run is ``pill demo``'s pipeline with the embedded models (SmolLM2-135M-Instruct,
EfficientNet-Lite0 block 10) and pill's own training loop: the same benchmark (data seed 0), the
same steps, batch, optimizer and schedule; only the switch a variant names changes. Each
variant trains once per seed (``train.seed``: initialisation and sample order) and is scored on
the test split, per question type.

Variants (``VARIANTS``): full PILL at three stage-2 learning rates; no MAG; one shared adapter
instead of MoMAE; linear and GELU adapters instead of SwiGLU; no stage 1; random wrong answers
(p = 0.1); gate learning rate x1 instead of the demo's x10. The learning-rate, wrong-answer and
gate variants fine-tune full PILL's stage-1 run of the same seed (they differ in stage 2 only).
Baselines: LoRA (PEFT, r 16, alpha 32, every linear layer of the LLM) + projector at three
stage-2 learning rates, after a projector-only stage 1 (LLaVA's recipe); the projector alone
(``pill.layers: []``); the frozen, untrained plugged model (its gates are zero: no image
information reaches the text); and a text-only model: full PILL trained and scored on the same
questions with the images removed.

Budget: 160 align + 110 fine-tune steps of batch 8 per run (the demo: 220 + 160) and 100 test
problems, so that the 16 variants x 2 seeds fit about 165 minutes on 2 cores in bf16.

Resumable: each finished run appends one line to ``<out>/runs.jsonl`` and is skipped when the
script runs again with the same settings; ``--only`` runs some variants. At the end (and with
``--report`` alone, without training) it writes ``<out>/ablations.json`` (mean, min and max over
seeds, per type; paired differences from full PILL), ``<out>/table.md`` and ``<out>/gates.png``
(mean |tanh(gate)| per layer: full PILL with gate lr x10 and x1, the paper's Figure 4).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Variant:
    name: str
    what: str  # one line for the table
    overrides: tuple[str, ...] = ()  # pill demo --set: both stages, or align:/finetune: only
    align: Optional[str] = "own"  # "own": its own stage 1; None: no stage 1; a variant's name: reuse its stage 1
    lora: bool = False  # LoRA on the LLM in stage 2 (its learning rate: the stage's optim.lr, the projector's too)
    text_only: bool = False  # trained and scored with the images removed
    train: bool = True  # False: score the untrained model
    claim: str = ""  # the paper's claim it tests (Table 3), if any


VARIANTS: tuple[Variant, ...] = (  # in the order they run: a run cut short has the most telling rows
    Variant("full", "PILL: SwiGLU adapters, MoMAE, MAG, both stages, lr 2e-3 (the demo)"),
    Variant("frozen", "baseline: untrained plugged model (zero gates)", train=False),
    Variant("no_mag", "no MAG (image values ungated)", ("pill.mag=false",), claim="MAG: +0.40"),
    Variant("projector", "baseline: projector only (pill.layers: [])", ("pill.layers=[]",)),
    Variant("lora_lr1e-3", "baseline: LoRA r16 + projector, stage-2 lr 1e-3",
            ("pill.layers=[]", "finetune:optim.lr=1e-3"), align="projector", lora=True),
    Variant("shared_adapter", "one shared FFN adapter instead of MoMAE", ("pill.momae=false",),
            claim="MoMAE on top of one adapter: +0.28"),
    Variant("linear", "linear adapters (classic, no activation)", ("pill.adapter=classic", "pill.activation=none"),
            claim="SwiGLU over linear: +0.64 (with MAG)"),
    Variant("no_stage1", "no stage 1 (fine-tune only)", ("finetune:init_from=null",), align=None,
            claim="caption pre-training helps (Table 3, rows 6-8)"),
    Variant("wrong_answers", "random wrong answers, p = 0.1", ("finetune:data.wrong_answer_p=0.1",), align="full",
            claim="random wrong answers: +0.33"),
    Variant("gate_lr1", "gate learning rate x1 (demo: x10)", ("finetune:optim.gate_lr_scale=1",), align="full"),
    Variant("lr4e-3", "PILL, stage-2 lr 4e-3", ("finetune:optim.lr=4e-3",), align="full"),
    Variant("text_only", "baseline: PILL trained and scored without the images",
            ("finetune:init_from=null", "model.feature_norm=false"), align=None, text_only=True),
    Variant("lora_lr3e-4", "baseline: LoRA r16 + projector, stage-2 lr 3e-4",
            ("pill.layers=[]", "finetune:optim.lr=3e-4"), align="projector", lora=True),
    Variant("lora_lr3e-3", "baseline: LoRA r16 + projector, stage-2 lr 3e-3",
            ("pill.layers=[]", "finetune:optim.lr=3e-3"), align="projector", lora=True),
    Variant("lr1e-3", "PILL, stage-2 lr 1e-3", ("finetune:optim.lr=1e-3",), align="full"),
    Variant("gelu", "GELU adapters (classic)", ("pill.adapter=classic", "pill.activation=gelu"),
            claim="GELU over linear: no gain"),
)

BY_NAME = {v.name: v for v in VARIANTS}


@dataclass
class Settings:
    out: Path
    seeds: list[int]
    n_train: int = 2000
    n_test: int = 100
    align_steps: int = 160
    finetune_steps: int = 110
    batch_size: int = 8
    lora_r: int = 16
    keep_runs: bool = False
    extra: list[str] = field(default_factory=list)  # --set for every variant

    def key(self) -> dict:
        """What makes two runs comparable (a finished run with another key is run again)."""
        return {"n_train": self.n_train, "n_test": self.n_test, "align_steps": self.align_steps,
                "finetune_steps": self.finetune_steps, "batch_size": self.batch_size, "lora_r": self.lora_r,
                "extra": list(self.extra)}


# -- data -------------------------------------------------------------------------------------

def benchmark(s: Settings) -> Path:
    """The built-in benchmark every run uses (data seed 0)."""
    from pill.demo import DemoSettings, _synth

    return _synth(s.out / "data", DemoSettings(n_train=s.n_train, n_test=s.n_test, seed=0))


def text_only_benchmark(data: Path) -> Path:
    """The same problems without their images (``image`` removed), for the text-only baseline."""
    from pill.io import write_atomic

    root = data.parent / "data-text-only"
    root.mkdir(parents=True, exist_ok=True)
    problems = json.loads((data / "problems.json").read_text())
    for p in problems.values():
        p["image"] = None
    write_atomic(root / "problems.json", json.dumps(problems))
    shutil.copyfile(data / "pid_splits.json", root / "pid_splits.json")
    return root


# -- one run ----------------------------------------------------------------------------------

def stage_configs(v: Variant, s: Settings, seed: int, precision, data: Path, run: Path) -> dict:
    from pill.demo import DemoSettings, stage_config

    overrides = list(s.extra) + list(v.overrides)
    if v.align not in ("own", None):
        overrides.append(f"finetune:init_from={run_dir(s, BY_NAME[v.align], seed) / 'align'}")
    st = DemoSettings(out=str(run), n_train=s.n_train, n_test=s.n_test, seed=seed, align_steps=s.align_steps,
                      finetune_steps=s.finetune_steps, batch_size=s.batch_size, overrides=tuple(overrides))
    cfgs = {stage: stage_config(st, precision, data, run, stage) for stage in ("align", "finetune")}
    for cfg in cfgs.values():
        cfg.train.save_every = 10 ** 6  # a run is short and rerun whole: no resumable checkpoints
    return cfgs


def run_dir(s: Settings, v: Variant, seed: int) -> Path:
    return s.out / "runs" / f"{v.name}-s{seed}"


def add_lora(vlm, r: int) -> int:
    """LoRA (PEFT) on every linear layer of the frozen LLM; returns its trainable parameter count."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS),
                            vlm.llm)
    return sum(p.numel() for n, p in vlm.llm.named_parameters() if "lora_" in n and p.requires_grad)


def run_variant(v: Variant, s: Settings, seed: int, precision, data: Path) -> dict:
    import torch

    from pill.build import build_vlm, fingerprints, load_stage
    from pill.data.scienceqa import load_problems, load_scienceqa
    from pill.demo import _per_category, measure_gates_on
    from pill.eval.evaluate import evaluate_scienceqa
    from pill.train.loop import train

    run = run_dir(s, v, seed)
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    if v.text_only:
        data = text_only_benchmark(data)
    cfgs = stage_configs(v, s, seed, precision, data, run)
    t0 = time.time()
    torch.manual_seed(seed)
    vlm = build_vlm(cfgs["finetune"])
    vlm.system_prompt = cfgs["finetune"].data.system_prompt
    timings, trainable = {}, {}
    if v.train:
        if v.align == "own":
            t = time.time()
            train(cfgs["align"], run / "align", vlm=vlm)
            timings["align"] = time.time() - t
            trainable["align"] = vlm.num_trainable()
        if v.lora:  # stage 1 first: LoRA changes the LLM that checkpoints are fingerprinted with
            if cfgs["finetune"].init_from:
                load_stage(vlm, Path(cfgs["finetune"].init_from) / "pill.safetensors", cfgs["finetune"],
                           fingerprints(vlm))
                cfgs["finetune"].init_from = None
            add_lora(vlm, s.lora_r)
        t = time.time()
        train(cfgs["finetune"], run / "finetune", vlm=vlm)
        timings["finetune"] = time.time() - t
        trainable["finetune"] = vlm.num_trainable()  # LoRA's included
    t = time.time()
    result = evaluate_scienceqa(vlm, data, "test", prompt_format=cfgs["finetune"].data.prompt_format,
                                batch_size=50, mode="generate", max_new_tokens=56, out_dir=run / "eval")
    timings["eval"] = time.time() - t
    problems = load_problems(data)
    row = {"variant": v.name, "seed": seed, "settings": s.key(), "accuracy": result["Avg"] / 100,
           "per_type": _per_category(result, problems), "test_problems": result["count"],
           "trainable_parameters": trainable, "seconds": timings, "wall_seconds": time.time() - t0,
           "precision": precision.name}
    if cfgs["finetune"].pill.mag and cfgs["finetune"].pill.layers != [] and not v.text_only:
        test = load_scienceqa(data, "test", prompt_format=cfgs["finetune"].data.prompt_format, limit=16,
                              progress=False, system_prompt=vlm.system_prompt)
        gates = measure_gates_on(vlm, test)
        row["gates"] = {"layers": gates["layers"], "mean_abs_gate": gates["mean_abs_gate"]}
    if not s.keep_runs:  # the stage 1 others reuse stays; the rest is large and never read again
        for sub in ("finetune",) if any(u.align == v.name for u in VARIANTS) else ("align", "finetune"):
            for f in (run / sub).glob("*.safetensors"):
                f.unlink()
    return row


# -- the table --------------------------------------------------------------------------------

def finished(s: Settings) -> dict[tuple[str, int], dict]:
    path = s.out / "runs.jsonl"
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("settings") == s.key():
                    rows[(r["variant"], r["seed"])] = r
    return rows


def summarise(rows: dict[tuple[str, int], dict], seeds: list[int]) -> dict:
    """Per variant: mean, min and max over seeds (overall and per type); paired differences from full."""
    out = {}
    full = {seed: rows[("full", seed)] for seed in seeds if ("full", seed) in rows}
    spread_full = _spread([r["accuracy"] for r in full.values()])
    for v in VARIANTS:
        got = [rows[(v.name, seed)] for seed in seeds if (v.name, seed) in rows]
        if not got:
            continue
        acc = [r["accuracy"] for r in got]
        types = sorted({t for r in got for t in r["per_type"]})
        entry = {"what": v.what, "claim": v.claim, "seeds": [r["seed"] for r in got], "accuracy": acc,
                 "mean": statistics.fmean(acc), "min": min(acc), "max": max(acc),
                 "per_type": {t: statistics.fmean(r["per_type"].get(t, 0.0) for r in got) for t in types},
                 "minutes": statistics.fmean(r["wall_seconds"] for r in got) / 60,
                 "trainable_parameters": got[0]["trainable_parameters"]}
        paired = [rows[(v.name, seed)]["accuracy"] - full[seed]["accuracy"] for seed in seeds
                  if seed in full and (v.name, seed) in rows]
        if v.name != "full" and paired:
            mean = statistics.fmean(paired)
            noise = max(spread_full, _spread(acc))
            same_sign = all(d > 0 for d in paired) or all(d < 0 for d in paired)
            entry["vs_full"] = {"per_seed": paired, "mean": mean, "seed_spread": noise,
                                "resolved": len(paired) >= 2 and same_sign and abs(mean) > noise}
        out[v.name] = entry
    return out


def _spread(values: list[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else 0.0


def gate_series(rows: dict[tuple[str, int], dict], seeds: list[int]) -> dict[str, list[float]]:
    series = {}
    for name, label in (("full", "full PILL, gate lr x10"), ("gate_lr1", "gate lr x1")):
        got = [rows[(name, seed)]["gates"] for seed in seeds if "gates" in rows.get((name, seed), {})]
        if got:
            series[f"{label} ({len(got)} seeds)"] = [statistics.fmean(g["mean_abs_gate"][i] for g in got)
                                                     for i in range(len(got[0]["mean_abs_gate"]))]
    return series


def table(summary: dict, s: Settings, machine: dict) -> str:
    types = sorted({t for e in summary.values() for t in e["per_type"]})
    lines = [f"{len(s.seeds)} seeds ({', '.join(map(str, s.seeds))}); {s.n_train} training, {s.n_test} test problems; "
             f"{s.align_steps} align + {s.finetune_steps} fine-tune steps of batch {s.batch_size}; "
             f"{machine.get('cpu', '?')}, {machine.get('precision', '?')}", "",
             "| variant | accuracy: mean (min-max) | vs full: mean (per seed) | resolved | "
             + " | ".join(types) + " | min/run |",
             "|---|---:|---:|:-:|" + "---:|" * len(types) + "---:|"]
    for name, e in summary.items():
        vs = e.get("vs_full")
        vs_text = (f"{100 * vs['mean']:+.1f} ({', '.join(f'{100 * d:+.1f}' for d in vs['per_seed'])})" if vs else "")
        resolved = ("yes" if vs["resolved"] else "no") if vs else ""
        lines.append(f"| {name}: {e['what']} | {100 * e['mean']:.1f}% ({100 * e['min']:.1f}-{100 * e['max']:.1f}) | "
                     f"{vs_text} | {resolved} | " + " | ".join(f"{100 * e['per_type'].get(t, 0):.0f}" for t in types)
                     + f" | {e['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def report(s: Settings, precision_name: str) -> dict:
    from bench.common import machine as machine_info
    from pill.eval.plots import plot_gates
    from pill.io import write_atomic

    rows = finished(s)
    summary = summarise(rows, s.seeds)
    machine = {**machine_info(), "precision": precision_name}
    write_atomic(s.out / "ablations.json", json.dumps({"settings": s.key(), "seeds": s.seeds, "machine": machine,
                                                       "variants": summary}, indent=2))
    write_atomic(s.out / "table.md", table(summary, s, machine))
    series = gate_series(rows, s.seeds)
    if series:
        layers = next(r["gates"]["layers"] for r in rows.values() if "gates" in r)
        plot_gates(series, s.out / "gates.png", layers=layers,
                   title="mean |tanh(gate)| of image tokens per layer, after stage 2")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--align-steps", type=int, default=160)
    p.add_argument("--finetune-steps", type=int, default=110)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--only", help="comma-separated variants (default: all); "
                                  f"known: {', '.join(v.name for v in VARIANTS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    p.add_argument("--keep-runs", action="store_true", help="keep every run's trained tensors")
    p.add_argument("--report", action="store_true", help="only write the table of the finished runs")
    a = p.parse_args(argv)
    from pill.errors import ConfigError
    from pill.precision import resolve_precision

    s = Settings(out=Path(a.out), seeds=a.seeds, n_train=a.n_train, n_test=a.n_test, align_steps=a.align_steps,
                 finetune_steps=a.finetune_steps, batch_size=a.batch_size, keep_runs=a.keep_runs, extra=a.set)
    names = a.only.split(",") if a.only else [v.name for v in VARIANTS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"ablations: unknown variant(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    precision = resolve_precision("auto")
    print(f"precision: {precision.describe()}")
    s.out.mkdir(parents=True, exist_ok=True)
    if not a.report:
        data = benchmark(s)
        # a variant that reuses another's stage 1 runs after it, on the same seed
        wanted = [v for v in VARIANTS if v.name in names]
        needed = {v.align for v in wanted if v.align not in ("own", None)}
        order = [v for v in VARIANTS if v.name in needed and v.name not in names] + wanted
        for v in order:  # variant by variant, every seed: a run cut short leaves whole rows
            for seed in s.seeds:
                reused = any(u.align == v.name for u in order)  # its stage 1 must still be there
                if (v.name, seed) in finished(s) and \
                        (not reused or (run_dir(s, v, seed) / "align" / "pill.safetensors").is_file()):
                    continue
                print(f"\n=== {v.name}, seed {seed}: {v.what}", flush=True)
                try:
                    row = run_variant(v, s, seed, precision, data)
                except ConfigError as e:
                    raise SystemExit(f"ablations: {v.name}, seed {seed}: {e}") from None
                with open(s.out / "runs.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                print(f"=== {v.name}, seed {seed}: {100 * row['accuracy']:.1f}% in {row['wall_seconds'] / 60:.1f} min",
                      flush=True)
    report(s, precision.name)
    print((s.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
