"""bench/gpu_check.py: its CPU smoke mode runs every code path and passes its checks; the pieces
that hold the arithmetic are right."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_smoke_runs_every_check_and_contender(tmp_path):
    out, md = tmp_path / "g.json", tmp_path / "g.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out),
                           "--markdown", str(md)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    fams = r["correctness"]["families"]
    assert set(fams) == {"llama", "qwen2"}
    checks = {"text_logits_equal_base", "zero_gate_values", "kv_cache_equals_recompute", "training_lowers_loss",
              "save_load_round_trip", "sdpa"}
    for f in fams.values():
        assert checks <= set(f) and all(f[c]["ok"] for c in checks), f
    assert r["correctness"]["ok"] is True and r["skipped"] == []
    sp = r["speed"]
    assert set(sp["step_time"]) == {"pill", "pill_compiled", "pill_fused", "frozen", "lora_qv", "compute_all"}
    assert {"pill/frozen", "pill_compiled/frozen", "pill_fused/pill", "pill/lora_qv",
            "compute_all/pill"} <= set(sp["step_time_ratios"])
    assert sp["trainable"]["pill"] == sp["trainable"]["pill_compiled"] == sp["trainable"]["compute_all"]
    assert sp["generation"]["ratio_tokens_per_s_vs_base"]["median"] > 0
    q = sp["scienceqa_extrapolation"]
    assert q["steps_per_epoch"] == -(-12726 // sp["shapes"]["batch"]) and q["pill"]["paper_epochs_hours"] > 0
    text = md.read_text()
    assert "(a) Correctness" in text and "(b) Speed and memory" in text and "LaVIN-7B" in text


def test_frozen_step_flops_at_llama2_7b():
    from bench.gpu_check import SHAPES, frozen_step_flops

    fl = frozen_step_flops(SHAPES["full"])
    P = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # the 7B's linear layers: 6.48e9 parameters
    assert fl["linear"] == 4 * P * 4 * 512
    assert fl["attention"] == 3 * 32 * 4 * 2 * 512 ** 2 * 4096
    assert fl["lm_head"] == 4 * 4096 * 32000 * 4 * 128
    assert 5.4e13 < fl["total"] < 5.8e13


def test_peak_table_and_shared_copy():
    from bench.gpu_check import peak_tflops, shared_copy
    from pill.models import build_llm_from_config

    assert peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak_tflops("some new chip")[0] is None
    base = build_llm_from_config("llama")
    twin = shared_copy(base)
    assert twin is not base and twin.model is not base.model
    assert all(a is b for a, b in zip(base.parameters(), twin.parameters()))  # one copy of the weights
    ids = torch.randint(0, 100, (1, 6))
    assert torch.equal(base(ids).logits, twin(ids).logits)


def test_top2_margin_reads_the_next_token_logits():
    from bench.gpu_check import _randomise, _tiny, _vlm, top2_margin

    vlm = _vlm(_tiny("llama", torch.device("cpu")), 4, 32)
    _randomise(vlm)
    ids = torch.randint(5, 2000, (1, 10))
    mods = torch.zeros_like(ids)
    mods[0, 1:5] = 1
    feats = torch.randn(1, 4, 32)
    tokens = vlm.generate(ids, modality_ids=mods, image_features=feats, max_new_tokens=3, eos_token_id=[])
    m = top2_margin(vlm, ids, mods, feats, tokens[:, :2], torch.device("cpu"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = vlm(input_ids=torch.cat([ids, tokens[:, :2]], 1),
                     modality_ids=torch.cat([mods, torch.zeros(1, 2, dtype=torch.long)], 1),
                     image_features=feats, logits="last").logits.float()
    assert int(logits.argmax(-1)) == int(tokens[0, 2])  # the same next token as generation
    assert m == float(logits[0].topk(2).values[0] - logits[0].topk(2).values[1]) and m >= 0
