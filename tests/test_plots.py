"""Training-curve and gate figures: real PNGs from matplotlib, clear errors on bad input."""

import argparse
import json

import pytest

from pill.errors import DataError
from pill.eval import commands
from pill.eval.plots import plot_gates, plot_training, read_gates, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_matplotlib_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 2000
    assert b"Matplotlib" in data  # the PNG "Software" text chunk matplotlib writes


def _run_cli(argv):
    parser = argparse.ArgumentParser(prog="pill")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _write_metrics(run, lines):
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")


def _two_stage_metrics():
    lines = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3 * min(1, s / 3), "stage": "align"} for s in range(10)]
    lines.append({"step": 9, "eval_accuracy": 0.4})  # events without a loss are skipped
    lines += [{"step": s, "loss": 2.0 - 0.05 * s, "lr": 5e-4, "stage": "finetune"} for s in range(10, 20)]
    return lines


def test_plot_training_writes_png(tmp_path):
    _write_metrics(tmp_path, _two_stage_metrics())
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 20 and {r["stage"] for r in records} == {"align", "finetune"}
    out = plot_training(records, tmp_path / "figs" / "loss.png", title="t")
    assert out == tmp_path / "figs" / "loss.png"
    _assert_matplotlib_png(out)


def test_plot_training_without_stage_or_lr(tmp_path):
    out = plot_training([{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}], tmp_path / "loss.png")
    _assert_matplotlib_png(out)


@pytest.mark.parametrize(
    "bad_line,match",
    [
        ("{oops", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"loss": 1.0}', "'step' must be a number"),
        ('{"step": 2, "loss": "high"}', "'loss' must be a number"),
        ('{"step": 2, "loss": 1.0, "lr": null}', "'lr' must be a number"),
    ],
)
def test_bad_metrics_line_names_file_and_line(tmp_path, bad_line, match):
    _write_metrics(tmp_path, [{"step": 0, "loss": 1.0, "lr": 1e-3}, "", bad_line])
    with pytest.raises(DataError, match=match) as err:
        read_metrics(tmp_path / "metrics.jsonl")
    assert "metrics.jsonl, line 3" in str(err.value)


def test_metrics_missing_or_without_loss(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_metrics(tmp_path / "metrics.jsonl")
    _write_metrics(tmp_path, [{"step": 0, "eval_accuracy": 0.1}])
    with pytest.raises(DataError, match="no line has a 'loss'"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_plot_training_rejects_bad_records(tmp_path):
    with pytest.raises(ValueError, match="no training records"):
        plot_training([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="record 1"):
        plot_training([{"step": 0, "loss": 1.0}, {"step": 1}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_gates_single_series(tmp_path):
    out = plot_gates([0.0, 0.02, 0.1, 0.3], tmp_path / "gates.png", title="token gate")
    _assert_matplotlib_png(out)


def test_plot_gates_several_series(tmp_path):
    values = {"token": [0.1, 0.2, 0.3], "head": [0.05, 0.1, 0.4]}
    _assert_matplotlib_png(plot_gates(values, tmp_path / "gates.png", layers=[10, 11, 12]))


@pytest.mark.parametrize(
    "values,match",
    [
        ([], "non-zero number of layers"),
        ({}, "no gate values"),
        ({"a": [0.1, 0.2], "b": [0.1]}, "same"),
        ([0.1, 1.5], "layer 1"),
        ([0.1, -0.2], "layer 1"),
        ([float("nan")], "layer 0"),
        (["0.1"], "layer 0"),
    ],
)
def test_plot_gates_bad_input(tmp_path, values, match):
    with pytest.raises(ValueError, match=match):
        plot_gates(values, tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


def test_plot_gates_layers_length(tmp_path):
    with pytest.raises(ValueError, match="layers has 1 entries for 2 values"):
        plot_gates([0.1, 0.2], tmp_path / "g.png", layers=[0])


def test_read_gates(tmp_path):
    path = tmp_path / "gates.json"
    path.write_text(json.dumps({"layers": [0, 1], "mean_abs_gate": [0.1, 0.2], "variant": "token"}))
    assert read_gates(path) == ([0, 1], [0.1, 0.2], "token")
    path.write_text(json.dumps({"layers": [0], "mean_abs_gate": [0.1, 0.2]}))
    with pytest.raises(DataError, match="'layers' has 1 entries"):
        read_gates(path)
    path.write_text(json.dumps({"mean_abs_gate": "0.1"}))
    with pytest.raises(DataError, match="non-empty list of numbers"):
        read_gates(path)


def test_cli_plot_training(tmp_path, capsys):
    run = tmp_path / "run"
    _write_metrics(run, _two_stage_metrics())
    assert _run_cli(["plot", "training", "--run", str(run), "--out", str(tmp_path / "loss.png")]) == 0
    _assert_matplotlib_png(tmp_path / "loss.png")
    assert "loss.png" in capsys.readouterr().out


def test_cli_plot_gates(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "gates.json").write_text(
        json.dumps({"layers": [0, 1, 2, 3], "mean_abs_gate": [0.01, 0.05, 0.2, 0.12], "variant": "token"})
    )
    assert _run_cli(["plot", "gates", "--run", str(run), "--out", str(tmp_path / "gates.png")]) == 0
    _assert_matplotlib_png(tmp_path / "gates.png")


def test_cli_plot_gates_missing_file(tmp_path):
    with pytest.raises(DataError, match="gates.json"):
        _run_cli(["plot", "gates", "--run", str(tmp_path), "--out", str(tmp_path / "gates.png")])
