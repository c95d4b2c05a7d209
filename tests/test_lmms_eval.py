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
