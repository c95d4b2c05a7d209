"""ScienceQA evaluation end to end on a tiny random model: both modes, files, scores, CLI."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from pill.data.collate import encode_sample
from pill.data.prompts import build_target
from pill.data.scienceqa import load_scienceqa
from pill.errors import ConfigError
from pill.eval import evaluate as ev
from pill.eval.scienceqa_score import CATEGORY_KEYS, SCORE_KEYS

# qid: (question, choices, answer, hint, has image, subject, grade)
PROBLEMS = {
    "t1": ("Which colour is the square?", ["red", "blue"], 0, "", True, "natural science", "grade2"),
    "t2": ("Which word is a noun?", ["run", "cat", "blue"], 1, "", False, "language science", "grade1"),
    "t3": ("Which state is farthest north?", ["Ohio", "Texas", "Maine", "Utah"], 2, "Look at the map.", True,
           "social science", "grade8"),
    "t4": ("What is 2 + 2?", ["3", "4", "5", "6", "7"], 1, "Add the numbers.", False, "natural science", "grade9"),
    "t5": ("Is the circle big?", ["yes", "no"], 1, "", True, "natural science", "grade4"),
    "t6": ("Which is a mammal?", ["shark", "whale"], 1, "", False, "natural science", "grade11"),
    "r1": ("Which is hot?", ["ice", "fire"], 1, "", False, "natural science", "grade3"),
}
TEST = ["t1", "t2", "t3", "t4", "t5", "t6"]


def make_scienceqa(root: Path) -> Path:
    """A tiny ScienceQA folder in the official layout: 6 test problems (3 with an image), 1 train."""
    problems = {}
    for i, (qid, (question, choices, answer, hint, image, subject, grade)) in enumerate(PROBLEMS.items()):
        split = "train" if qid.startswith("r") else "test"
        problems[qid] = {"question": question, "choices": choices, "answer": answer, "hint": hint,
                         "image": "image.png" if image else None, "task": "closed choice", "grade": grade,
                         "subject": subject, "topic": subject.split()[0], "category": "c", "skill": "",
                         "lecture": "A lecture.", "solution": "A solution.", "split": split}
        if image:
            folder = root / "images" / split / qid
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 24), (40 * i, 200 - 30 * i, 90)).save(folder / "image.png")
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["r1"], "test": TEST}))
    return root


@pytest.fixture
def sqa(tmp_path):
    return make_scienceqa(tmp_path / "sqa")


@pytest.fixture
def vlm(tiny_vlm):
    torch.manual_seed(1)  # non-zero plug-ins, so the images change the answers
    for n, p in tiny_vlm.named_parameters():
        if "pill_" in n:
            torch.nn.init.normal_(p, std=0.05)
    return tiny_vlm.eval()


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("mode", ["generate", "likelihood"])
def test_evaluate_writes_official_predictions_and_scores(vlm, sqa, tmp_path, mode):
    out = tmp_path / "eval"
    # batch size 4 over 6 problems: batches mix image and text-only prompts
    result = ev.evaluate_scienceqa(vlm, sqa, "test", batch_size=4, mode=mode, out_dir=out,
                                   max_new_tokens=4, progress=False)
    assert set(SCORE_KEYS) <= set(result)
    assert result["count"] == 6 and result["mode"] == mode
    assert set(result["files"]) == {"predictions", "generations", "scores"}

    preds = json.loads((out / "predictions.json").read_text())
    assert list(preds["results"]) == TEST  # split order
    for qid, value in preds["results"].items():
        assert isinstance(value, int) and -1 <= value < len(PROBLEMS[qid][1])
    scores = json.loads((out / "scores.json").read_text())
    assert set(CATEGORY_KEYS) <= set(scores) and scores["eval"]["mode"] == mode
    assert scores["Avg"] == result["Avg"]

    rows = _read_jsonl(out / "generations.jsonl")
    assert [r["qid"] for r in rows] == TEST
    assert all("Question:" in r["prompt"] and "Options:" in r["prompt"] for r in rows)
    assert [r["answer"] for r in rows] == [PROBLEMS[q][2] for q in TEST]
    right = sum(r["correct"] for r in rows)
    assert result["Avg"] == pytest.approx(100 * right / 6)
    if mode == "likelihood":
        assert result["unparsed"] == 0
        for r in rows:
            lp = r["option_logprobs"]
            assert len(lp) == len(PROBLEMS[r["qid"]][1]) and r["prediction"] == lp.index(max(lp))
    else:
        assert all(isinstance(r["generation"], str) for r in rows)
        unparsed = sum(r["prediction"] is None for r in rows)
        assert result["unparsed"] == unparsed
        assert sum(v == -1 for v in preds["results"].values()) == unparsed


def test_generated_answers_are_extracted_and_scored(vlm, sqa, tmp_path, monkeypatch):
    """A model that always says "The answer is B." (then end of turn and junk): right on t2 t4 t5 t6."""
    tok = vlm.tokenizer
    said = tok("The answer is B.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + \
        tok(" The answer is A.", add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids, max_new_tokens=8, **kw):
        assert max_new_tokens == 8  # the default for output format A
        return torch.tensor([said[:max_new_tokens]] * input_ids.shape[0])

    monkeypatch.setattr(vlm, "generate", fake_generate)
    result = ev.evaluate_scienceqa(vlm, sqa, "test", out_dir=tmp_path, progress=False)
    assert result["Avg"] == pytest.approx(400 / 6) and result["unparsed"] == 0
    assert result["LAN"] == 100.0 and result["SOC"] == 0.0 and result["IMG"] == pytest.approx(100 / 3)
    rows = _read_jsonl(tmp_path / "generations.jsonl")
    assert {r["generation"] for r in rows} == {"The answer is B."}  # cut at the end of turn
    assert json.loads((tmp_path / "predictions.json").read_text())["results"] == dict.fromkeys(TEST, 1)
    assert result["predictions"] == dict.fromkeys(TEST, 1)


def test_limit_is_respected_and_nothing_written_without_out_dir(vlm, sqa, tmp_path):
    result = ev.evaluate_scienceqa(vlm, sqa, "test", limit=2, mode="likelihood", progress=False)
    assert result["count"] == 2 and result["files"] == {}
    with pytest.raises(ConfigError, match="mode"):
        ev.evaluate_scienceqa(vlm, sqa, "test", mode="beam", progress=False)
    with pytest.raises(ConfigError, match="limit"):
        ev.evaluate_scienceqa(vlm, sqa, "test", limit=0, progress=False)


def test_generation_batched_equals_one_by_one(vlm, sqa):
    samples = load_scienceqa(sqa, "test", prompt_format="QCM-A", progress=False)
    batched = ev.generate_answers(vlm, samples, batch_size=6, max_new_tokens=4)
    single = [ev.generate_answers(vlm, [s], batch_size=1, max_new_tokens=4)[0] for s in samples[:3]]
    assert batched[:3] == single


def test_likelihood_ranking_matches_unbatched_hand_computation(vlm, sqa):
    """log P(letter | prompt, "The answer is"), batched with left padding, equals the same
    log-probability read off an unpadded forward pass over each option's training encoding."""
    samples = load_scienceqa(sqa, "test", prompt_format="QCM-ALE", progress=False)
    batched = ev.option_logprobs(vlm, samples, batch_size=4)
    processor = vlm.processor
    prefix, letters = ev.answer_prefix(processor)
    assert processor.tokenizer.decode(prefix).strip() == "The answer is"
    assert [processor.tokenizer.decode([t]).strip() for t in letters] == list("ABCDE")

    from pill.data.images import load_image

    for s, scores in zip(samples, batched):
        assert len(scores) == len(s.meta["choices"])
        features = vlm.encode_images(processor.preprocess([load_image(p) for p in s.images])) if s.images else None
        for c in range(len(s.meta["choices"])):
            target = build_target(s.meta["problem"], "ALE", answer=c)
            option_c = replace(s, messages=s.messages[:-1] + [{"role": "assistant", "content": target}])
            enc = encode_sample(option_c, processor, None)  # the training tokens, answer = option c
            first = next(i for i, x in enumerate(enc.labels) if x != -100)
            pos = first + len(prefix)  # the letter token
            assert enc.input_ids[first:pos] == prefix and enc.input_ids[pos] == letters[c]
            inputs = {"input_ids": torch.tensor([enc.input_ids[:pos]]),
                      "modality_ids": torch.tensor([enc.modality_ids[:pos]])}
            if features is not None:
                inputs["image_features"] = features  # (1, K, d_vpg), computed once per problem
            logits = vlm(**inputs, logits="all").logits[0, -1]
            expected = torch.log_softmax(logits.float(), -1)[letters[c]].item()
            assert scores[c] == pytest.approx(expected, abs=1e-4)


def test_default_generation_length():
    assert ev.default_max_new_tokens("QCM-A") == 8
    assert ev.default_max_new_tokens("QCM-ALE") == 256
    assert ev.default_max_new_tokens("QCM-LA") == 256


def _parser():
    from pill.eval.run_commands import register

    parser = argparse.ArgumentParser(prog="pill")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_eval_cli_uses_the_run_prompt_format_and_default_out_dir(vlm, sqa, tmp_path, monkeypatch, capsys):
    from pill import build
    from pill.runconfig import DataConfig, TrainConfig, save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(TrainConfig(data=DataConfig(root=str(sqa), prompt_format="QCM-AE")), run / "config.yaml")
    monkeypatch.setattr(build, "load_run", lambda run_dir, device="cpu": vlm)
    args = _parser().parse_args(["eval", "scienceqa", "--run", str(run), "--limit", "3", "--batch-size", "2",
                                 "--mode", "likelihood", "--device", "cpu"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "format QCM-AE" in printed and "| NAT | SOC |" in printed
    assert "scored: 3" in printed
    scores = json.loads((run / "eval-test" / "scores.json").read_text())
    assert scores["count"] == 3 and scores["eval"]["prompt_format"] == "QCM-AE"


def test_eval_cli_names_a_folder_that_is_not_a_run(tmp_path, sqa):
    from pill.errors import CheckpointError

    args = _parser().parse_args(["eval", "scienceqa", "--run", str(tmp_path), "--data", str(sqa)])
    with pytest.raises(CheckpointError, match="not a pill run directory"):
        args.func(args)


@pytest.mark.embedded
def test_eval_cli_on_a_saved_embedded_run(sqa, tmp_path, capsys):
    """The real path: load_run rebuilds the embedded model from a run directory and evaluates it."""
    from pill.models import fingerprint_llm
    from pill.checkpoint import save_weights
    from pill.runconfig import DataConfig, ModelConfig, TrainConfig, save_config
    from pill.vlm import PillVLM

    cfg = TrainConfig(model=ModelConfig(pool=2), data=DataConfig(root=str(sqa), prompt_format="QCM-A"))
    m = cfg.model
    model = PillVLM.from_pretrained(m.llm, m.vpg, m.vpg_path, cfg.pill, pool=m.pool)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_weights(run / "pill.safetensors", model.pill_state_dict(),
                 {"stage": cfg.stage, "llm_fingerprint": fingerprint_llm(model.llm),
                  "vpg_fingerprint": model.vpg.fingerprint()})
    del model
    out = tmp_path / "out"
    from pill.cli import main

    assert main(["eval", "scienceqa", "--run", str(run), "--limit", "2", "--max-new-tokens", "8",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert "scored: 2" in capsys.readouterr().out
    assert len(_read_jsonl(out / "generations.jsonl")) == 2
