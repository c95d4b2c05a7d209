"""bench/run.py works end to end in its tiny mode and writes every required key (no timing checks)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

REQUIRED = {
    "step_time_ratio_vs_frozen": {"128", "256", "512"},
    "step_time_ratio_vs_lora": {"128", "256", "512"},
    "routing_ratio_vs_compute_all": {"0.1", "0.5", "0.9"},
    "generation_ratio_vs_base": None,
    "feature_cache_speedup": None,
    "peak_memory_ratio_vs_frozen": None,
    "cli_startup_seconds": None,
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_run_writes_every_required_ratio(smoke):
    for key, inner in REQUIRED.items():
        assert key in smoke, key
        value = smoke[key]
        if inner is None:
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
        else:
            assert set(value) >= inner, (key, sorted(value))
            assert all(math.isfinite(v) and v > 0 for v in value.values()), (key, value)
    assert set(smoke["targets"]) == set(REQUIRED)
    assert smoke["meta"]["mode"] == "smoke" and smoke["meta"]["command"].startswith("python ")


@pytest.mark.slow
def test_smoke_run_reports_paper_scale(smoke):
    ps = smoke["paper_scale"]
    P = 45_088_768  # LLaMA-2-7B + BLIP-2 Q-Former, stage 2 (design note, section 3)
    assert ps["trainable_stage2"] == P
    assert ps["trainable_stage1"] == 15_728_640
    assert ps["optimizer_state_bytes"] == 12 * P  # AdamW m + v + fp32 master
    assert ps["weight_bytes_bf16"]["llm"] == 2 * 6_738_415_616
    acts = ps["activation_bytes"]
    assert 0 < acts["checkpointing"] < acts["no_checkpointing"] < acts["keep_plugin_activations"]
    assert isinstance(ps["fits_48gb_stage2"], bool)


@pytest.mark.slow
def test_smoke_run_compares_the_same_contenders(smoke):
    step = smoke["details"]["step_time"]
    assert step["order"] == ["pill", "frozen", "lora", "full"]
    assert step["vpg_in_timing"] is False
    trainable = step["trainable"]
    assert trainable["frozen"] < trainable["lora"] and trainable["frozen"] < trainable["pill"] < trainable["full"]
    mem = smoke["details"]["memory"]["contenders"]
    assert set(mem) == {"pill", "pill-keep", "frozen", "lora", "full"}
    assert all(m["peak_bytes"] > 0 for m in mem.values())


def test_paper_scale_activation_formula_matches_autograd_on_small_layers():
    from bench.paper_scale import Shapes, layer_bytes_per_token, measure_saved

    s = Shapes(layers=2, d=256, f=688, heads=4, kv_heads=2, vocab=500, r=8, K=16, d_vpg=32)
    for pill, recompute in ((True, True), (True, False), (False, False)):
        per_layer = measure_saved(s, 128, 2, pill, recompute) - measure_saved(s, 128, 1, pill, recompute)
        per = layer_bytes_per_token(s, pill, recompute)
        assert 128 * per["text"] + s.K * per["image_extra"] == per_layer, (pill, recompute)
