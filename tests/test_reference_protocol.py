"""The reference prompt style and the reference ScienceQA protocol (DsaltYfish/PILL).

The expected texts are built here the way the reference's datasets build theirs
(``system_message + "Image:N/A.\\n" + prompt + "[/INST]"``, the image variant replacing
``Image:N/A`` by ``Image:`` + slots; answers ``The answer is X. BECAUSE: lecture solution``)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from pill.data.collate import chat_segments, encode_sample
from pill.data.llava import load_llava
from pill.data.prompts import REFERENCE_SYSTEM_PROMPT
from pill.data.scienceqa import load_scienceqa
from pill.errors import ConfigError
from pill.eval import evaluate as ev
from test_eval import PROBLEMS, TEST, make_scienceqa

SYSTEM = ("[INST]<<SYS>>\nYou are a language vision assistant. Based on the image, question, context, and options, "
          "please give an appropriate response, including your choice and reason.\n<</SYS>>\n\n")


@pytest.fixture
def sqa(tmp_path):
    return make_scienceqa(tmp_path / "sqa")


def _reference_prompt(qid: str, has_image: bool) -> str:
    question, choices, _, hint, _, _, _ = PROBLEMS[qid]
    options = " ".join(f"({'ABCDE'[i]}) {c}" for i, c in enumerate(choices))
    prompt = f"Question: {question}\nContext: {hint or 'N/A'}\nOptions: {options}"
    text = SYSTEM + "Image:N/A.\n" + prompt + "[/INST]"
    return text.replace("Image:N/A", "Image:<image>") if has_image else text


def test_reference_scienceqa_text_is_the_reference_datasets(sqa, tokenizer):
    assert REFERENCE_SYSTEM_PROMPT in SYSTEM
    samples = load_scienceqa(sqa, "test", prompt_format="QCM-ALE", prompt_style="reference", progress=False)
    for s in samples:
        text = "".join(t for t, _ in chat_segments(s.messages, tokenizer, s.meta.get("template")))
        answer = "ABCDE"[PROBLEMS[s.id][2]]
        expected = (tokenizer.bos_token + _reference_prompt(s.id, PROBLEMS[s.id][4])
                    + f"The answer is {answer}. BECAUSE: A lecture. A solution." + tokenizer.eos_token)
        assert text == expected
        labels = [t for t, is_label in chat_segments(s.messages, tokenizer, s.meta.get("template")) if is_label]
        assert labels == [f"The answer is {answer}. BECAUSE: A lecture. A solution." + tokenizer.eos_token]


def test_reference_quirks_empty_because_and_the_al_ae_swap(sqa):
    problems = json.loads((sqa / "problems.json").read_text())
    problems["t2"]["lecture"] = problems["t2"]["solution"] = ""
    (sqa / "problems.json").write_text(json.dumps(problems))
    ref = {s.id: s for s in load_scienceqa(sqa, "test", prompt_format="QCM-ALE", prompt_style="reference",
                                           progress=False)}
    ours = {s.id: s for s in load_scienceqa(sqa, "test", prompt_format="QCM-ALE", progress=False)}
    assert ref["t2"].messages[-1]["content"] == "The answer is B. BECAUSE:"  # base_prompt.py keeps it
    assert ours["t2"].messages[-1]["content"] == "The answer is B."
    problems["t1"]["lecture"], problems["t1"]["solution"] = "L.", "S."
    (sqa / "problems.json").write_text(json.dumps(problems))
    al = load_scienceqa(sqa, "test", prompt_format="QCM-AL", prompt_style="reference", progress=False)[0]
    assert al.messages[-1]["content"] == "The answer is A. BECAUSE: S."  # the reference's AL writes the solution
    assert ours["t1"].messages[0]["role"] == "user" and ours["t1"].messages[0]["content"].startswith("<image>\n")


def test_reference_llava_turns(tmp_path, tokenizer):
    record = {"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]}
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "d.json").write_text(json.dumps([record]))
    s = load_llava(tmp_path / "d.json", tmp_path, prompt_style="reference", progress=False)[0]
    segments = chat_segments(s.messages, tokenizer, s.meta["template"])
    b, e = tokenizer.bos_token, tokenizer.eos_token
    assert "".join(t for t, _ in segments) == f"{b}[INST]<image>\nWhat is it?[/INST]A cat.{e}{b}[INST]Colour?[/INST]Grey.{e}"
    assert [t for t, lab in segments if lab] == [f"A cat.{e}", f"Grey.{e}"]


def test_reference_regex_reads_like_the_reference():
    assert ev.reference_answer("The answer is B. BECAUSE: x", 3) == 1
    assert ev.reference_answer("The answer is Bx", 3) == 1  # '.' matches any character
    assert ev.reference_answer("The answer is B", 3) is None  # nothing after the letter: no match
    assert ev.reference_answer("the answer is b.", 3) is None
    assert ev.reference_answer("The answer is D.", 3) is None  # past the options: the fallback draws
    assert ev.reference_answer("The answer is C. The answer is A.", 3) == 2  # the first hit


@pytest.fixture
def vlm(tiny_vlm):
    return tiny_vlm.eval()


def _fake_generate(vlm, calls):
    """A model that answers B to the noun and the mammal question, rambles elsewhere."""
    tok = vlm.tokenizer

    def generate(input_ids, max_new_tokens=8, **kw):
        calls.append({"max_new_tokens": max_new_tokens, **{k: kw.get(k) for k in ("do_sample", "temperature",
                                                                                  "top_p")},
                      "shortest": int(kw["attention_mask"].sum(-1).min())})
        rows = []
        for row in input_ids:
            text = tok.decode(row)
            said = "The answer is B. BECAUSE: it is." if ("noun" in text or "mammal" in text) else "I think so"
            rows.append(tok(said, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])

    return generate


def test_reference_protocol_samples_parses_and_falls_back(vlm, sqa, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(vlm, "generate", _fake_generate(vlm, calls))
    seed = 3
    result = ev.evaluate_scienceqa(vlm, sqa, "test", prompt_format="QCM-ALE", protocol="reference", seed=seed,
                                   batch_size=2, out_dir=tmp_path / "ref", progress=False)
    assert all(c["do_sample"] and c["temperature"] == 0.1 and c["top_p"] == 0.75 for c in calls)
    assert all(c["max_new_tokens"] == 512 - c["shortest"] for c in calls)  # prompt + answer <= 512
    parsed = {"t2": 1, "t6": 1}  # right on both
    assert result["unparsed"] == 4 and result["protocol"] == "reference" and result["prompt_style"] == "reference"
    rng, right = random.Random(seed), 0
    for qid in TEST:  # the fallback draws, in split order, as eval_sqa.py's get_pred_idx
        pred = parsed[qid] if qid in parsed else rng.choice(range(len(PROBLEMS[qid][1])))
        right += pred == PROBLEMS[qid][2]
    assert result["Avg"] == pytest.approx(100 * right / 6)
    scores = json.loads((tmp_path / "ref" / "scores.json").read_text())
    assert scores["eval"]["protocol"] == "reference" and scores["eval"]["seed"] == seed
    rows = [json.loads(line) for line in (tmp_path / "ref" / "generations.jsonl").read_text().splitlines()]
    assert all(r["prompt"].endswith("[/INST]") for r in rows)


def test_pill_protocol_counts_unparsed_as_wrong(vlm, sqa, monkeypatch):
    calls = []
    monkeypatch.setattr(vlm, "generate", _fake_generate(vlm, calls))
    result = ev.evaluate_scienceqa(vlm, sqa, "test", prompt_format="QCM-ALE", progress=False)
    assert all(not c["do_sample"] for c in calls)
    assert result["unparsed"] == 4 and result["Avg"] == pytest.approx(200 / 6)
    with pytest.raises(ConfigError, match="protocol"):
        ev.evaluate_scienceqa(vlm, sqa, "test", protocol="paper", progress=False)
    with pytest.raises(ConfigError, match="generate"):
        ev.evaluate_scienceqa(vlm, sqa, "test", protocol="reference", mode="likelihood", progress=False)


def test_reference_sampling_is_seeded(vlm, sqa):
    samples = load_scienceqa(sqa, "test", prompt_style="reference", limit=2, progress=False)
    a = ev.generate_answers(vlm, samples, max_new_tokens=4, temperature=0.1, top_p=0.75, seed=5)
    b = ev.generate_answers(vlm, samples, max_new_tokens=4, temperature=0.1, top_p=0.75, seed=5)
    assert a == b


def test_reference_style_run_trains_and_tokenises(vlm, sqa):
    samples = load_scienceqa(sqa, "test", prompt_style="reference", progress=False)
    enc = encode_sample(samples[0], vlm.processor, 512)  # the sample's own template, with image slots
    assert enc.num_images == 1 and sum(m == 1 for m in enc.modality_ids) == vlm.processor.num_image_tokens


def test_data_inspect_shows_the_reference_prompts(sqa, capsys):
    from pill.cli import main

    assert main(["data", "inspect", "scienceqa", "--root", str(sqa), "--format", "QCM-ALE", "--limit", "2",
                 "--prompt-style", "reference", "--model", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    assert "Image:<image>.\nQuestion: Which colour is the square?" in out and "Image:N/A.\nQuestion: Which word" in out
    assert "[INST]<<SYS>>\nYou are a language vision assistant." in out and "[/INST]The answer is" in out
