"""MME: reading the benchmark's two folder layouts, the official results files, the official scores."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pill.errors import DataError
from pill.eval import mme, mme_score


def write_results(root: Path, rows: dict[str, list[tuple[str, str, str, str]]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in rows.items():
        (root / f"{name}.txt").write_text("".join("\t".join(r) + "\n" for r in lines))
    return root


# answers whose reading is known: "Yes, ..." -> yes; "Not ..." -> no ("no" in the first four
# characters); "I don't know" -> other; "No" -> no; "yes" -> yes; "There is no dog" -> other
RESULTS = {
    "existence": [("a.jpg", "Is there a dog?", "Yes", "Yes, there is."),   # right
                  ("a.jpg", "Is there a cat?", "No", "Not at all."),       # right   -> image a: both
                  ("b.jpg", "Is there a car?", "Yes", "No"),               # wrong
                  ("b.jpg", "Is there a bus?", "No", "no")],               # right   -> image b: one
    "count": [("c.png", "Are there two?", "Yes", "I don't know"),          # other, wrong
              ("c.png", "Are there three?", "No", "There is no dog")],     # other, wrong
    "code_reasoning": [("d.png", "Does it print 3?", "No", "nope"),        # right
                       ("d.png", "Does it print 4?", "Yes", "YES")],       # right
}


def test_scores_match_the_hand_computed_official_ones(tmp_path):
    scores = mme_score.score_results(write_results(tmp_path / "res", RESULTS))
    ex, cnt, code = (scores["subtasks"][n] for n in ("existence", "count", "code_reasoning"))
    assert (ex["acc"], ex["acc_plus"], ex["score"], ex["other"]) == (75.0, 50.0, 125.0, 0)
    assert (cnt["acc"], cnt["acc_plus"], cnt["score"], cnt["other"]) == (0.0, 0.0, 0.0, 2)
    assert (code["acc"], code["acc_plus"], code["score"]) == (100.0, 100.0, 200.0)
    assert scores["perception"] == 125.0 and scores["cognition"] == 200.0
    assert "OCR" in scores["missing"] and "existence" not in scores["missing"]


@pytest.mark.parametrize("answer, reading", [
    ("yes", "yes"), ("No", "no"), ("Yes.", "yes"), (" yes", "yes"), ("noo", "no"), ("none", "no"),
    ("The answer is yes", "other"), ("eyes", "yes"), ("", "other"), ("Unknown", "other"), ("nothing", "no"),
])
def test_answers_are_read_like_the_official_tool(answer, reading):
    assert mme_score.parse_answer(answer) == reading


def test_score_cli_prints_table_and_json(tmp_path, capsys):
    from pill.cli import main

    res = write_results(tmp_path / "res", RESULTS)
    assert main(["score", "mme", "--results", str(res), "--json"]) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert data["perception"] == 125.0 and data["subtasks"]["count"]["other"] == 2
    assert "note: no results for" in out.err
    assert main(["score", "mme", "--results", str(res)]) == 0
    table = capsys.readouterr().out
    assert "| existence | 75.00 | 50.00 | 125.00 | 0 |" in table and "**200.00**" in table


def test_malformed_results_name_the_file_and_line(tmp_path, capsys):
    from pill.cli import main

    bad = write_results(tmp_path / "bad", {"existence": [("a.jpg", "Q?", "Maybe", "yes"), ("a.jpg", "Q2?", "No", "no")]})
    assert main(["score", "mme", "--results", str(bad)]) == 1
    assert "existence.txt:1: ground truth must be Yes or No" in capsys.readouterr().err
    split = write_results(tmp_path / "split", {"color": [("a.jpg", "Q?", "Yes", "yes"), ("b.jpg", "Q?", "No", "no")]})
    with pytest.raises(DataError, match="different images"):
        mme_score.score_results(split)


def make_mme(root: Path) -> Path:
    """Both layouts of the release: 'artwork' with images/ + questions_answers_YN/, 'existence' and
    'code_reasoning' with image and questions side by side."""
    colours = iter([(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90), (10, 10, 10)])
    art = root / "artwork"
    (art / "images").mkdir(parents=True)
    (art / "questions_answers_YN").mkdir()
    for stem in ("10", "11"):
        Image.new("RGB", (24, 24), next(colours)).save(art / "images" / f"{stem}.jpg")
        (art / "questions_answers_YN" / f"{stem}.txt").write_text(
            f"Is this painting {stem}? Please answer yes or no.\tYes\nIs this a photo? Please answer yes or no.\tNo\n")
    for name, stem in (("existence", "000000006040"), ("code_reasoning", "0001")):
        (root / name).mkdir()
        Image.new("RGB", (24, 24), next(colours)).save(root / name / f"{stem}.png")
        (root / name / f"{stem}.txt").write_text("Is there a red thing?\tNo\nIs there\ta thing?\tYes\n")
    return root


@pytest.fixture
def mme_root(tmp_path):
    return make_mme(tmp_path / "MME_Benchmark_release_version")


def test_both_layouts_are_read(mme_root):
    qs = mme.load_mme(mme_root)
    assert list(qs) == ["existence", "artwork", "code_reasoning"]  # official order
    assert [q.image_name for q in qs["artwork"]] == ["10.jpg", "10.jpg", "11.jpg", "11.jpg"]
    assert qs["existence"][1].question == "Is there\ta thing?" and qs["existence"][1].answer == "Yes"
    assert all(Path(q.image).is_file() for v in qs.values() for q in v)


def test_bad_benchmark_files_are_named(mme_root):
    (mme_root / "existence" / "000000006040.txt").write_text("Is it?\tYes\n")
    with pytest.raises(DataError, match=r"000000006040.txt: expected the two questions"):
        mme.load_mme(mme_root)
    (mme_root / "existence" / "000000006040.txt").write_text("Is it?\tYes\nIs it not?\tPerhaps\n")
    with pytest.raises(DataError, match=r"000000006040.txt:2: the answer must be Yes or No"):
        mme.load_mme(mme_root)
    (mme_root / "existence" / "000000006040.png").unlink()
    with pytest.raises(DataError, match=r"no image 000000006040"):
        mme.load_mme(mme_root)


@pytest.mark.parametrize("protocol", ["pill", "reference"])
def test_evaluate_writes_official_results_and_scores(tiny_vlm, mme_root, tmp_path, monkeypatch, protocol):
    vlm = tiny_vlm.eval()
    tok = vlm.tokenizer
    calls = []

    def fake_generate(input_ids, max_new_tokens=8, **kw):
        calls.append(kw)
        rows = []
        for row in input_ids:  # "Yes" to questions about paintings, a two-line ramble otherwise
            said = "Yes" if "painting" in tok.decode(row) else "No\tit is\nnot"
            rows.append(tok(said, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])

    monkeypatch.setattr(vlm, "generate", fake_generate)
    out = tmp_path / "results"
    result = mme.evaluate_mme(vlm, mme_root, out, protocol=protocol, batch_size=3, progress=False)
    assert all(c["do_sample"] == (protocol == "reference") for c in calls)
    assert all("pixel_values" in c for c in calls)  # every question is asked with its image
    lines = (out / "artwork.txt").read_text().splitlines()
    assert lines[0] == "10.jpg\tIs this painting 10? Please answer yes or no.\tYes\tYes"
    assert lines[1] == "10.jpg\tIs this a photo? Please answer yes or no.\tNo\tNo it is not"
    ex = (out / "existence.txt").read_text().splitlines()
    assert ex[1] == "000000006040.png\tIs there a thing?\tYes\tNo it is not"  # tabs in the question, too
    assert result["subtasks"]["artwork"]["score"] == 200.0
    assert result["subtasks"]["existence"]["score"] == 50.0  # one of two right, no image with both
    assert result["perception"] == 250.0 and result["cognition"] == 50.0
    assert set(result["files"]) == {"existence", "artwork", "code_reasoning"}


def test_eval_mme_cli(tiny_vlm, mme_root, tmp_path, monkeypatch, capsys):
    from pill import build
    from pill.cli import main
    from pill.runconfig import TrainConfig, save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(TrainConfig(), run / "config.yaml")
    monkeypatch.setattr(build, "load_run", lambda run_dir, device="cpu": tiny_vlm.eval())
    assert main(["eval", "mme", "--run", str(run), "--data", str(mme_root), "--subtask", "existence",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "MME, protocol pill: 2 questions" in printed and "| **perception** |" in printed
    assert len((run / "eval-mme" / "existence.txt").read_text().splitlines()) == 2
    assert main(["eval", "mme", "--run", str(run), "--data", str(tmp_path / "nowhere")]) == 1
    assert "MME folder not found" in capsys.readouterr().err
