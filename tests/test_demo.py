"""A shortened `pill demo` on the embedded default models: every phase runs, every file is written."""
import json

import pytest


@pytest.mark.embedded
@pytest.mark.slow
def test_quick_demo_writes_report_and_plots(tmp_path):
    from pill.demo import DemoSettings, run_demo

    st = DemoSettings(out=str(tmp_path / "demo"), n_train=16, n_test=8, align_steps=2, finetune_steps=2,
                      batch_size=4, max_new_tokens=16, quick=True)
    report = run_demo(st)
    out = tmp_path / "demo"
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy_before"] == report["accuracy_before"]
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["wall_seconds"] > 0 and saved["test_problems"] == 8
    assert set(saved["per_type_after"]) <= {"color", "shape", "exists", "position", "count"}
    for name in ("gates.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("align", "finetune"):
        assert (out / stage / "pill.safetensors").is_file()
    from safetensors.torch import load_file

    w = load_file(str(out / "finetune" / "pill.safetensors"))
    # block-10 features, standardised with the statistics of the 16 training images (16 tokens each)
    assert w["pill_projector.weight"].shape == (576, 112) and int(w["pill_feature_norm.count"]) == 16 * 16
    assert (out / "eval-after" / "predictions.json").is_file()
    gates = json.loads((out / "finetune" / "gates.json").read_text())
    assert len(gates["mean_abs_gate"]) == 30
