"""bench/ablations.py: every variant's settings load; a tiny run of the variants writes rows, the table
and the gate plot, resumes without rerunning; the summary calls a difference resolved only when it
is larger than the seed spread."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import ablations  # noqa: E402

TINY = ["--set", "model.llm=llama", "--set", "model.random_init=true"]


def test_every_variant_has_valid_stage_configs(tmp_path):
    """The overrides of every variant are valid config values (checked by the loader, no training)."""
    from pill.precision import resolve_precision

    s = ablations.Settings(out=tmp_path, seeds=[0])
    precision = resolve_precision("float32")
    for v in ablations.VARIANTS:
        cfgs = ablations.stage_configs(v, s, 0, precision, tmp_path / "data", tmp_path / "run")
        ft = cfgs["finetune"]
        if v.align is None:
            assert ft.init_from is None, v.name
        elif v.align != "own":
            assert ft.init_from == str(ablations.run_dir(s, ablations.BY_NAME[v.align], 0) / "align"), v.name
        assert ft.optim.max_steps == s.finetune_steps and cfgs["align"].optim.max_steps == s.align_steps
    assert ablations.stage_configs(ablations.BY_NAME["no_mag"], s, 0, precision, tmp_path, tmp_path)[
        "finetune"].pill.mag is False
    assert ablations.stage_configs(ablations.BY_NAME["projector"], s, 0, precision, tmp_path, tmp_path)[
        "finetune"].pill.layers == []


@pytest.fixture(scope="module")
def tiny_ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablations")
    args = ["--out", str(out), "--seeds", "0", "1", "--n-train", "16", "--n-test", "4", "--align-steps", "2",
            "--finetune-steps", "2", "--only", "full,no_mag,lora_lr1e-3,text_only,frozen",
            "--set", f"train.cache_dir={out / 'cache'}", *TINY]
    assert ablations.main(args) == 0
    return out, args


def test_tiny_run_writes_rows_table_and_gates(tiny_ablation):
    out, _ = tiny_ablation
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    # lora reuses the projector's stage 1, which runs first though not asked for
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted(
        (v, s) for v in ("full", "no_mag", "lora_lr1e-3", "text_only", "frozen", "projector") for s in (0, 1))
    by = {(r["variant"], r["seed"]): r for r in rows}
    projector = by[("projector", 0)]["trainable_parameters"]["finetune"]
    lora = by[("lora_lr1e-3", 0)]["trainable_parameters"]["finetune"]
    assert lora > projector and "align" not in by[("lora_lr1e-3", 0)]["trainable_parameters"]
    assert by[("frozen", 0)]["trainable_parameters"] == {}
    assert "gates" in by[("full", 0)] and "gates" not in by[("no_mag", 0)]
    problems = json.loads((out / "data-text-only" / "problems.json").read_text())
    assert all(p["image"] is None for p in problems.values())
    generations = (out / "runs" / "text_only-s0" / "eval" / "generations.jsonl").read_text()
    assert "<image>" not in generations
    summary = json.loads((out / "ablations.json").read_text())["variants"]
    assert len(summary["no_mag"]["vs_full"]["per_seed"]) == 2
    table = (out / "table.md").read_text()
    for name in ("full", "no_mag", "lora_lr1e-3", "text_only", "frozen", "projector"):
        assert f"| {name}: " in table
    assert (out / "gates.png").stat().st_size > 0
    # the trained tensors of runs nobody reuses are gone; the stage 1 that others reuse stays
    assert not list((out / "runs" / "no_mag-s0").rglob("*.safetensors"))
    for name in ("projector", "full"):
        assert (out / "runs" / f"{name}-s0" / "align" / "pill.safetensors").is_file()
        assert not (out / "runs" / f"{name}-s0" / "finetune" / "pill.safetensors").exists()


def test_a_second_run_skips_the_finished_ones(tiny_ablation, capsys):
    out, args = tiny_ablation
    before = (out / "runs.jsonl").read_text()
    assert ablations.main(args) == 0
    assert (out / "runs.jsonl").read_text() == before
    assert "=== " not in capsys.readouterr().out


def test_unknown_variant_is_named(tmp_path):
    with pytest.raises(SystemExit, match="unknown variant.*nope"):
        ablations.main(["--out", str(tmp_path), "--only", "full,nope"])


def _row(variant, seed, acc):
    return {"variant": variant, "seed": seed, "accuracy": acc, "per_type": {"color": acc},
            "wall_seconds": 60.0, "trainable_parameters": {}}


def test_resolved_only_beyond_the_seed_spread():
    rows = {(r["variant"], r["seed"]): r for r in [
        _row("full", 0, 0.60), _row("full", 1, 0.64),
        _row("no_mag", 0, 0.50), _row("no_mag", 1, 0.52),  # -0.11 on average, spread 0.04: resolved
        _row("gelu", 0, 0.62), _row("gelu", 1, 0.63),  # -0.005 on average: not resolved
        _row("linear", 0, 0.70), _row("linear", 1, 0.55),  # the signs differ: not resolved
    ]}
    s = ablations.summarise(rows, [0, 1])
    assert s["no_mag"]["vs_full"]["resolved"] is True
    assert s["no_mag"]["vs_full"]["mean"] == pytest.approx(-0.11)
    assert s["gelu"]["vs_full"]["resolved"] is False
    assert s["linear"]["vs_full"]["resolved"] is False
    assert "vs_full" not in s["full"]
    one_seed = ablations.summarise(rows, [0])
    assert one_seed["no_mag"]["vs_full"]["resolved"] is False  # one seed resolves nothing
