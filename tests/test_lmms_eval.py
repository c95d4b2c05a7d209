"""The lmms-eval adapter (pill.integrations.lmms_eval) on a tiny random run, driven the way
lmms-eval drives a "simple" model: request objects whose ``.args`` carry the prompt, the
generation settings or target, and a function of the task's document that returns its images."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pill.errors import ConfigError, PillError


@dataclass
class Request:  # the part of lmms_eval.api.instance.Instance that a model reads
    args: tuple


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from pill.data.synth import make_synth
    from pill.runconfig import TrainConfig
    from pill.train.loop import train

    tmp = tmp_path_factory.mktemp("lmms")
    make_synth(tmp / "data", n_train=4, n_test=4, seed=0, progress=False)
    cfg = TrainConfig.from_dict({
        "model": {"llm": "llama", "random_init": True, "pool": 2},
        "data": {"format": "scienceqa", "root": str(tmp / "data"), "split": "train", "max_length": 160},
        "optim": {"batch_size": 4, "micro_batch_size": 4},
        "train": {"cache_dir": str(tmp / "cache")}})
    train(cfg, tmp / "run", max_steps=1, progress=False)
    return {"run": tmp / "run", "data": tmp / "data"}


@pytest.fixture(scope="module")
def model(run):
    from pill.data.images import load_image
    from pill.data.scienceqa import load_scienceqa
    from pill.integrations.lmms_eval import PillLMMS

    m = PillLMMS(run=str(run["run"]), device="cpu", batch_size="1", max_new_tokens="6")
    samples = load_scienceqa(run["data"], "test", progress=False)
    docs = [{"question": s.messages[0]["content"], "image": load_image(s.images[0]) if s.images else None}
            for s in samples]
    m.task_dict = {"synth": {"test": docs}}
    return m


def visuals(doc):
    return [doc["image"]]


def test_generate_until_answers_each_request_through_the_chat_path(model):
    from pill.chat import ChatSession

    doc = model.task_dict["synth"]["test"][0]
    reqs = [Request((doc["question"], {"max_new_tokens": 5, "temperature": 0, "until": []}, visuals, i, "synth",
                     "test")) for i in range(2)]
    answers = model.generate_until(reqs)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    expected = ChatSession(model.vlm, max_new_tokens=5).ask(doc["question"], [doc["image"]])
    assert answers[0] == expected
    if expected:  # `until` cuts the answer at its first stop string
        stop = expected[len(expected) // 2:][:2] or expected
        cut = model.generate_until([Request((doc["question"], {"max_new_tokens": 5, "until": [stop]}, visuals, 0,
                                             "synth", "test"))])[0]
        assert cut == expected.split(stop, 1)[0]


def test_loglikelihood_is_the_continuation_log_probability(model):
    from pill.data.prompts import render_chat

    vlm = model.vlm
    doc = model.task_dict["synth"]["test"][1]
    context = doc["question"]
    placeholder = vlm.modalities["image"].placeholder
    content = context if placeholder in context else f"{placeholder}\n{context}"
    # the greedy next token after the prompt, as text
    prompt = render_chat(vlm.tokenizer, ([{"role": "system", "content": vlm.system_prompt}]
                                         if vlm.system_prompt is not None else [])
                         + [{"role": "user", "content": content}], add_generation_prompt=True)
    batch = vlm.processor([prompt], [[doc["image"]]])
    with torch.no_grad():
        last = torch.log_softmax(vlm(**batch, logits="last").logits[0].float(), -1)  # (V,)
    ranked = last.argsort(descending=True).tolist()
    for t in ranked[:50]:  # a token that survives decode -> encode after the prompt
        text = vlm.tokenizer.decode([t])
        if text.strip() and vlm.processor([prompt + text], [[doc["image"]]])["input_ids"].shape[1] == \
                batch["input_ids"].shape[1] + 1:
            break
    (lp, greedy), = model.loglikelihood([Request((context, text, visuals, 1, "synth", "test"))])
    assert lp == pytest.approx(float(last[t]), abs=1e-4)
    assert greedy == (t == ranked[0])
    # a target given as a function of the document, and a token that is not the greedy one
    other = next(u for u in ranked[1:200] if vlm.tokenizer.decode([u]).strip() and vlm.processor(
        [prompt + vlm.tokenizer.decode([u])], [[doc["image"]]])["input_ids"].shape[1] == batch["input_ids"].shape[1] + 1)
    (lp2, greedy2), = model.loglikelihood([Request((context, lambda d: vlm.tokenizer.decode([other]), visuals, 1,
                                                    "synth", "test"))])
    assert lp2 == pytest.approx(float(last[other]), abs=1e-4) and lp2 < 0 and greedy2 is False


def test_model_args_and_unsupported_requests(model):
    from pill.integrations.lmms_eval import PillLMMS

    assert model.max_new_tokens == 6 and model.batch_size_per_gpu == 1 and model.rank == 0 and model.world_size == 1
    with pytest.raises(ConfigError, match="run=RUN_DIR"):
        PillLMMS()
    with pytest.raises(PillError, match="multi-round"):
        model.generate_until_multi_round([])


def test_lmms_eval_finds_the_model_by_name():
    """Where lmms-eval and pill are installed (``pip install 'pill[lmms-eval]'``)."""
    pytest.importorskip("lmms_eval")
    from lmms_eval import models

    from pill.integrations.lmms_eval import PillLMMS

    assert models.get_model("pill") is PillLMMS


TASK_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = "\\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(doc["choices"]))
    return f"{doc['question']}\\n{options}\\nAnswer with the option's letter from the given choices directly."


def doc_to_target(doc):
    return chr(65 + doc["answer"])


def process_results(doc, results):
    pred = results[0].strip()
    return {"exact_match": float(bool(pred) and pred[0].upper() == doc_to_target(doc))}
'''

TASK_YAML = '''task: pill_synth_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
  until: ["\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
'''


def test_lmms_eval_runs_a_local_task_from_the_synthetic_benchmark(run, tmp_path):
    """``lmms-eval --model pill`` end to end on the synthetic test split, offline (where lmms-eval
    and pill are installed)."""
    pytest.importorskip("lmms_eval")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = run["data"]
    problems = json.loads((data / "problems.json").read_text())
    jsonl = tmp_path / "synth_test.jsonl"
    with open(jsonl, "w") as f:
        for qid in json.loads((data / "pid_splits.json").read_text())["test"]:
            p = problems[qid]
            f.write(json.dumps({"question": p["question"], "choices": p["choices"], "answer": p["answer"],
                                "image": str(data / "images" / "test" / qid / p["image"])}) + "\n")
    task = tmp_path / "tasks" / "pill_synth"
    task.mkdir(parents=True)
    (task / "utils.py").write_text(TASK_UTILS)
    (task / "pill_synth_gen.yaml").write_text(TASK_YAML.format(jsonl=jsonl))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "pill", "--model_args",
                           f"run={run['run']},device=cpu", "--tasks", "pill_synth_gen", "--include_path",
                           str(tmp_path / "tasks"), "--batch_size", "1", "--output_path", str(tmp_path / "out"),
                           "--log_samples"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert 0.0 <= results["results"]["pill_synth_gen"]["exact_match,none"] <= 1.0
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("*_samples_pill_synth_gen.jsonl")).open()]
    assert len(samples) == 4 and all(isinstance(s["filtered_resps"], str) for s in samples)
