"""``pill data inspect`` and ``pill data synth`` through their argparse registration."""
import argparse
import json
import shutil
from pathlib import Path

import pytest

from pill.data.commands import register
from pill.errors import ConfigError, DataError

ASSETS = Path(__file__).parent / "assets"


def run(argv):
    parser = argparse.ArgumentParser(prog="pill")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_inspect_scienceqa(capsys):
    assert run(["data", "inspect", "scienceqa", "--root", str(ASSETS / "scienceqa"), "--split", "test",
                "--format", "QCM-ALE", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    for text in ("problems: 3", "with_image: 2", "with_hint: 1", "missing_image_files: 0",
                 "--- 103, answer B", "<image>\nQuestion: Which shape is shown?",
                 "The answer is B. BECAUSE: A circle is round. The shape is a circle.", "--- 104"):
        assert text in out
    assert "--- 105" not in out


def test_inspect_counts_missing_files_and_skips(tmp_path, capsys):
    root = tmp_path / "sqa"
    shutil.copytree(ASSETS / "scienceqa", root)
    (root / "images" / "test" / "103" / "image.png").unlink()
    with pytest.raises(DataError, match="problem 103"):
        run(["data", "inspect", "scienceqa", "--root", str(root)])
    assert "missing_image_files: 1" in capsys.readouterr().out  # counts come before the error
    assert run(["data", "inspect", "scienceqa", "--root", str(root), "--skip-bad", "--caption"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 (missing_image)" in out and "Context: Figure: a circle. A red circle on gray." in out


def test_inspect_parquet_and_bad_format(capsys):
    assert run(["data", "inspect", "scienceqa", "--root", str(ASSETS / "scienceqa_parquet"), "--limit", "1"]) == 0
    assert "--- test-0, answer B; images: <" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="QCLEM"):
        run(["data", "inspect", "scienceqa", "--root", str(ASSETS / "scienceqa"), "--format", "QCM-X"])


def test_inspect_llava(capsys):
    assert run(["data", "inspect", "llava", "--json", str(ASSETS / "llava" / "mix665k.json"),
                "--image-folder", str(ASSETS / "llava" / "images"), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "kept 3 of 3" in out and "text_only: 1" in out and "[assistant]\nGreen." in out


def test_synth_command(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    assert run(["data", "synth", "--out", str(out_dir), "--n-train", "6", "--n-test", "3", "--seed", "2"]) == 0
    splits = json.loads((out_dir / "pid_splits.json").read_text())
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert len(json.loads((out_dir / "captions_llava.json").read_text())) == 6
    assert "text_baseline" in capsys.readouterr().out


def test_help_without_action(capsys):
    assert run(["data"]) == 2
    assert "inspect" in capsys.readouterr().out


@pytest.mark.embedded
def test_inspect_with_chat_template(capsys):
    assert run(["data", "inspect", "scienceqa", "--root", str(ASSETS / "scienceqa"), "--limit", "1",
                "--model", "smollm2-135m-instruct", "--template", "llama-2"]) == 0
    out = capsys.readouterr().out
    assert "text tokens + the image tokens" in out and "[INST] <image>\nQuestion: Which shape is shown?" in out
