"""Run the PILL benchmarks and write one JSON file (see BENCHMARKS.md).

    python bench/run.py                 # the full set (about 17 minutes on a 2-core CPU)
    python bench/run.py --quick         # a reduced set (about 4 minutes on a 2-core CPU)
    python bench/run.py --smoke         # tiny random model, one repetition: checks the plumbing only
    python bench/run.py --only routing,paper_scale --out r.json

Items: step_time (1), routing (2), generation (3), feature_cache (4), memory (5), paper_scale (6),
cli_startup (7: ``pill --help`` and argument errors, each in a fresh process),
compile (8: train.compile, full set or --only compile).
Every ratio in the JSON is measured within this one run. The device is picked automatically
(CUDA with bf16 autocast when available, else CPU in float32).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` as a package, from any cwd

ITEMS = ("step_time", "routing", "generation", "feature_cache", "memory", "paper_scale", "cli_startup", "compile")
# measured only when named (--only compile) or in the full set: compiling costs minutes on a CPU
OPTIONAL = ("compile",)

# Repetitions and sizes per mode. Full: about 17 min on 2 CPU cores (one thread); quick: about 4 min.
MODES = {
    "full": dict(model="embedded", contenders=("pill", "frozen", "lora", "full"), lengths=[128, 256, 512],
                 step_warmup=1, step_reps=4, step_warmup_length=None, memory_length=512,
                 routing_fractions=[0.1, 0.5, 0.9], routing_warmup=5, routing_reps=30,
                 gen_tokens=64, gen_warmup=1, gen_reps=5, cache_images=32, cache_batch=8, cache_warmup=1,
                 cache_reps=2, paper_measure=True, paper_frozen=True, cli_reps=5),
    # quick: only the contenders the required ratios need; the memory step at length 128
    "quick": dict(model="embedded", contenders=("pill", "frozen", "lora"), lengths=[512],
                  step_warmup=1, step_reps=2, step_warmup_length=None, memory_length=128,
                  routing_fractions=[0.1, 0.5, 0.9], routing_warmup=3, routing_reps=10,
                  gen_tokens=16, gen_warmup=1, gen_reps=2, cache_images=8, cache_batch=4, cache_warmup=0,
                  cache_reps=1, paper_measure=False, paper_frozen=False, cli_reps=3),
    "smoke": dict(model="tiny", contenders=("pill", "frozen", "lora", "full"), lengths=[128, 256, 512],
                  step_warmup=0, step_reps=1, step_warmup_length=None, memory_length=128,
                  routing_fractions=[0.1, 0.5, 0.9], routing_warmup=0, routing_reps=1,
                  gen_tokens=4, gen_warmup=0, gen_reps=1, cache_images=4, cache_batch=2, cache_warmup=0,
                  cache_reps=1, paper_measure=False, paper_frozen=False, cli_reps=1),
}

TARGETS = {  # key -> (comparison, bound, inner key that the target applies to)
    "step_time_ratio_vs_frozen": ("<=", 1.10, "512"),
    "step_time_ratio_vs_lora": ("<=", 1.05, "512"),
    "routing_ratio_vs_compute_all": ("<=", 0.60, "0.5"),
    "generation_ratio_vs_base": (">=", 0.90, None),
    "feature_cache_speedup": (">=", 2.0, None),
    "peak_memory_ratio_vs_frozen": ("<=", 1.10, None),
    "cli_startup_seconds": ("<=", 0.5, None),  # the slowest of help / sub-command help / argument error
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _targets(result: dict) -> dict:
    out = {}
    for key, (op, bound, inner) in TARGETS.items():
        value = result.get(key)
        if isinstance(value, dict):
            value = value.get(inner)
        if value is None:
            continue
        met = value <= bound if op == "<=" else value >= bound
        out[key] = {"value": value, "target": f"{op} {bound}", "at": inner, "met": bool(met)}
    return out


def run(args) -> dict:
    from bench.common import machine, pick_device

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.lengths:
        cfg["lengths"] = [int(x) for x in args.lengths.split(",")]
    if args.reps:
        cfg["step_reps"] = args.reps
    device = pick_device(args.device)
    items = tuple(i for i in ITEMS if mode == "full" or i not in OPTIONAL) if not args.only \
        else tuple(args.only.split(","))
    unknown = set(items) - set(ITEMS)
    if unknown:
        raise SystemExit(f"--only: unknown item(s) {sorted(unknown)}; choose from {', '.join(ITEMS)}")
    result: dict = {
        "meta": {"mode": mode, "device": device.type, "model": cfg["model"],
                 "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                 "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "machine": {**machine(), "platform": platform.platform()},
                 "precision": "bf16 autocast" if device.type == "cuda" else "float32",
                 "config": cfg, "seconds": {}, "loadavg": {}},
        "details": {},
    }
    meta = result["meta"]

    def timed_item(name, fn):
        if name not in items:
            return None
        _log(f"[{name}]")
        meta["loadavg"][name + "_before"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        t = time.perf_counter()
        out = fn()
        meta["seconds"][name] = round(time.perf_counter() - t, 1)
        meta["loadavg"][name + "_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        result["details"][name] = out
        return out

    t_all = time.perf_counter()
    from bench import cli_startup, feature_cache, generation, paper_scale, routing, training

    r = timed_item("step_time", lambda: training.bench_step_time(
        cfg["lengths"], cfg["model"], device, cfg["step_warmup"], cfg["step_reps"], contenders=cfg["contenders"],
        log=_log, warmup_length=cfg["step_warmup_length"]))
    if r:
        for b in cfg["contenders"][1:]:
            result[f"step_time_ratio_vs_{b}"] = {L: row["ratios"][f"pill_vs_{b}"]["median"]
                                                 for L, row in r["lengths"].items()}

    width = 576 if cfg["model"] == "embedded" else 64  # the hidden size of the embedded / tiny LLM
    r = timed_item("routing", lambda: routing.bench_routing(
        cfg["routing_fractions"], width, device, cfg["routing_warmup"], cfg["routing_reps"], log=_log))
    if r:
        result["routing_ratio_vs_compute_all"] = {f: v["ratio_train"]["median"] for f, v in r["fractions"].items()}
        result["routing_ratio_vs_compute_all_forward"] = {f: v["ratio_forward"]["median"]
                                                          for f, v in r["fractions"].items()}

    r = timed_item("generation", lambda: generation.bench_generation(
        cfg["model"], device, cfg["gen_tokens"], cfg["gen_warmup"], cfg["gen_reps"], log=_log))
    if r:
        result["generation_ratio_vs_base"] = r["ratio_tokens_per_s_vs_base"]["median"]
        result["generation_tokens_per_s"] = {k: r[k]["tokens_per_s"] for k in ("pill", "base", "hf_generate")}

    r = timed_item("feature_cache", lambda: feature_cache.bench_feature_cache(
        cfg["model"], device, cfg["cache_images"], cfg["cache_batch"], cfg["cache_warmup"], cfg["cache_reps"],
        log=_log))
    if r:
        result["feature_cache_speedup"] = r["speedup"]["median"]

    r = timed_item("memory", lambda: training.bench_memory(
        cfg["memory_length"], cfg["model"], device, contenders=(*cfg["contenders"], "pill-keep"), log=_log,
        in_process=mode == "smoke"))
    if r:
        # Headline: peak of live tensor bytes (max_memory_allocated on CUDA, the profiler's memory
        # timeline on CPU); the process-level peak RSS, allocator effects included, next to it.
        result["peak_memory_ratio_vs_frozen"] = r["ratios"]["pill_vs_frozen"]["tensor_peak_bytes"]
        result["peak_memory_ratio_vs_frozen_rss"] = r["ratios"]["pill_vs_frozen"]["peak_bytes"]
        # the same with train.recompute_plugins off (plug-in activations kept for the backward)
        keep = r["contenders"]["pill-keep"]["tensor_peak_bytes"] / max(r["contenders"]["frozen"]["tensor_peak_bytes"], 1)
        result["peak_memory_ratio_vs_frozen_keep_activations"] = keep
        result["peak_memory_bytes"] = {n: c["tensor_peak_bytes"] for n, c in r["contenders"].items()}

    r = timed_item("paper_scale", lambda: paper_scale.bench_paper_scale(
        measure=cfg["paper_measure"], measure_frozen=cfg["paper_frozen"], log=_log))
    if r:
        result["paper_scale"] = {k: r[k] for k in (
            "trainable_stage2", "trainable_stage1", "optimizer_state_bytes", "weight_bytes_bf16",
            "trainable_bytes", "activation_bytes", "total_bytes", "fits_48gb", "activation_formula")}
        result["paper_scale"]["fits_48gb_stage2"] = all(result["paper_scale"]["fits_48gb"]["no_checkpointing"].values())

    r = timed_item("cli_startup", lambda: cli_startup.bench_cli_startup(
        warmup=1 if cfg["cli_reps"] > 1 else 0, reps=cfg["cli_reps"], log=_log))
    if r:
        result["cli_startup_seconds"] = r["slowest_median_s"]
        result["cli_startup_cpu_seconds"] = r["slowest_median_cpu_s"]
    r = timed_item("compile", lambda: training.bench_compile(
        cfg["lengths"][-1], cfg["model"], device, 1, max(2, cfg["step_reps"] - 1), log=_log))
    if r:
        result["compile_step_ratio_vs_eager"] = r["ratio_compiled_vs_eager"]["median"]

    meta["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    result["targets"] = _targets(result)
    return result


def table(result: dict) -> str:
    """The headline ratios against their targets, as a Markdown table."""
    lines = ["| measurement | value | target | met |", "|---|---:|---:|:---:|"]
    for key, (op, bound, inner) in TARGETS.items():
        value = result.get(key)
        if value is None:
            continue
        t = result["targets"].get(key, {})
        if isinstance(value, dict):
            for k, v in value.items():
                target = f"{op} {bound}" if k == inner else ""
                mark = ("yes" if t.get("met") else "**no**") if k == inner else ""
                lines.append(f"| {key} [{k}] | {v:.3f} | {target} | {mark} |")
        else:
            lines.append(f"| {key} | {value:.3f} | {op} {bound} | {'yes' if t['met'] else '**no**'} |")
    ps = result.get("paper_scale")
    if ps:
        lines.append(f"| paper_scale trainable (stage 2) | {ps['trainable_stage2']:,} | | |")
        lines.append(f"| paper_scale fits 48 GB (stage 2, no checkpointing) | {ps['fits_48gb_stage2']} | | |")
    return "\n".join(lines)


def details(result: dict) -> str:
    """Absolute numbers behind the ratios, as Markdown tables."""
    d, out = result["details"], []
    if "step_time" in d:
        st = d["step_time"]
        names = st["order"]
        out += [f"Step time, seconds (median of {st['reps']}; batch {st['batch']} x L, {st['visual_tokens']} visual "
                f"tokens per row, loss on the last {st['answer_fraction']:.0%}; AdamW step included)", "",
                "| L | " + " | ".join(names) + " | " + " | ".join(f"pill/{n}" for n in names[1:]) + " |",
                "|---:|" + "---:|" * (2 * len(names) - 1)]
        for L, row in st["lengths"].items():
            r = row["ratios"]
            out.append(f"| {L} | " + " | ".join(f"{row[n]['median_s']:.2f}" for n in names) + " | "
                       + " | ".join(f"{r[f'pill_vs_{n}']['median']:.3f}" for n in names[1:]) + " |")
        out += ["", "Trainable parameters: " + ", ".join(f"{n} {v:,}" for n, v in st["trainable"].items()), ""]
    if "memory" in d:
        m = d["memory"]
        out += [f"Peak memory of a training step at {m['batch']} x {m['length']}, MiB (tensor peak: live tensors; "
                f"process peak: {m['method']})", "",
                "| contender | tensor peak | / frozen | process peak | / frozen | saved activations | / frozen |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        f = m["contenders"]["frozen"]
        for n, c in m["contenders"].items():
            out.append(f"| {n} | " + " | ".join(f"{c[k] / 2**20:.0f} | {c[k] / f[k]:.3f}" for k in (
                "tensor_peak_bytes", "peak_bytes", "saved_activation_bytes")) + " |")
        cats = {n: c.get("tensor_peak_by_category") for n, c in m["contenders"].items()}
        if all(cats.values()):
            keys = [k for k in next(iter(cats.values())) if any(c[k] for c in cats.values())]
            out += ["", "Live tensors at the peak, by category, MiB", "", "| contender | " + " | ".join(keys) + " |",
                    "|---|" + "---:|" * len(keys)]
            for n, c in cats.items():
                out.append(f"| {n} | " + " | ".join(f"{c[k] / 2**20:.0f}" for k in keys) + " |")
        out.append("")
    if "routing" in d:
        r = d["routing"]
        out += [f"MoMAE routing, ms (x: {r['batch']} x {r['length']} x {r['dim']}, r = {r['r']}; median of {r['reps']})",
                "", "| image fraction | gather/scatter fwd+bwd | compute-all fwd+bwd | ratio | gather/scatter fwd "
                "| compute-all fwd | ratio |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for f, v in r["fractions"].items():
            out.append(f"| {f} | {v['train']['gather_scatter']['median_s'] * 1e3:.1f} | "
                       f"{v['train']['compute_all']['median_s'] * 1e3:.1f} | {v['ratio_train']['median']:.3f} | "
                       f"{v['forward']['gather_scatter']['median_s'] * 1e3:.1f} | "
                       f"{v['forward']['compute_all']['median_s'] * 1e3:.1f} | {v['ratio_forward']['median']:.3f} |")
        out.append("")
    if "generation" in d:
        g = d["generation"]
        out += [f"Generation, batch 1, prompt {g['prompt_tokens']} tokens ({g['visual_tokens']} visual), "
                f"{g['new_tokens']} new tokens, KV cache (median of {g['reps']})", "",
                "| decoder | seconds | tokens/s |", "|---|---:|---:|"]
        for n in ("pill", "base", "hf_generate"):
            out.append(f"| {n} | {g[n]['median_s']:.2f} | {g[n]['tokens_per_s']:.1f} |")
        out.append("")
    if "feature_cache" in d:
        c = d["feature_cache"]
        b = c["breakdown_vpg_epoch_s"]
        out += [f"Stage-1 epoch: {c['images']} synthetic images, batch {c['batch']}, {c['steps_per_epoch']} steps, "
                f"{c['visual_tokens']} visual tokens, ~{c['mean_sequence_tokens']:.0f} tokens per sample", "",
                "| epoch | seconds |", "|---|---:|",
                f"| VPG every step | {c['epoch_vpg']['median_s']:.2f} |",
                f"| cached features | {c['epoch_cache']['median_s']:.2f} |",
                f"| (one-off cache build) | {c['cache_build_s']:.2f} |", "",
                f"VPG epoch breakdown: load + preprocess {b['load_preprocess_s']:.2f} s, VPG {b['vpg_s']:.2f} s, "
                f"LLM step {b['llm_step_s']:.2f} s; cache reads {b['cache_read_s']:.3f} s per epoch. "
                f"Upper bound on the speed-up (Amdahl): {c['amdahl_bound']:.2f}x.", ""]
    if "cli_startup" in d:
        c = d["cli_startup"]
        out += [f"Command-line start-up, seconds per call in a fresh process (median of {c['reps']})", "",
                "| call | median wall | max wall | median CPU |", "|---|---:|---:|---:|"]
        for n, cmd in c["calls"].items():
            out.append(f"| `{cmd}` | {c['median_s'][n]:.3f} | {c['max_s'][n]:.3f} | {c['median_cpu_s'][n]:.3f} |")
        out.append("")
    if "compile" in d:
        c = d["compile"]
        out += [f"train.compile: the pill step at {c['batch']} x {c['length']}, eager against compiled layers "
                f"(median of {c['reps']}; the first compiled step, which compiles, took {c['first_compiled_step_s']:.0f} s)",
                "", "| layers | seconds |", "|---|---:|", f"| eager | {c['eager']['median_s']:.2f} |",
                f"| compiled | {c['compiled']['median_s']:.2f} |",
                f"| compiled / eager | {c['ratio_compiled_vs_eager']['median']:.3f} |", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a reduced set (always includes length 512 and fraction 0.5)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, one repetition (tests)")
    p.add_argument("--out", default="bench_results.json", help="JSON file to write")
    p.add_argument("--markdown", help="also write the Markdown tables to this file")
    p.add_argument("--only", help=f"comma-separated items: {', '.join(ITEMS)}")
    p.add_argument("--lengths", help="override the step-time sequence lengths, e.g. 128,512")
    p.add_argument("--reps", type=int, help="override the timed rounds of the step-time benchmark")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: ratios stay stable on a shared machine; 0 = torch's choice)")
    # internal: one contender's memory measurement in a fresh process
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", default="embedded", help=argparse.SUPPRESS)
    p.add_argument("--patch", help=argparse.SUPPRESS)  # bench/experiments.py: a candidate library change
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        from bench.common import pick_device
        from bench.training import memory_worker

        from bench.experiments import patched

        with patched(*(args.patch.split("+") if args.patch else ())):
            print(json.dumps(memory_worker(args.memory_worker, args.length, args.model, pick_device(args.device))))
        return 0
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    if args.markdown:
        Path(args.markdown).write_text(table(result) + "\n\n" + details(result) + "\n")
    print(f"\nwrote {args.out} ({result['meta']['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
