"""End-to-end training on tiny random models (CPU): both stages, resume after kill -9,
1-vs-2-process equivalence, feature-cache equivalence, config validation."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pill.errors import CheckpointError, ConfigError
from pill.runconfig import TrainConfig, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses run tiny models: one thread each (two spin against each other on 2 cores).
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from pill.data.synth import make_synth

    root = tmp_path_factory.mktemp("synth")
    make_synth(root, n_train=24, n_test=8, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


def tiny_config(synth_root, feature_dir, **changes) -> dict:
    cfg = {
        "stage": "finetune",
        "model": {"llm": "llama", "random_init": True, "pool": 2},
        "data": {"format": "scienceqa", "root": str(synth_root), "split": "train", "prompt_format": "QCM-A",
                 "max_length": 160},
        "optim": {"lr": 3.0e-3, "epochs": 1, "batch_size": 8, "micro_batch_size": 4, "warmup_ratio": 0.1},
        "train": {"save_every": 2, "keep_last": 2, "cache_dir": str(feature_dir), "log_every": 1},
    }
    for key, value in changes.items():  # native values: the dict is also written out as YAML
        *sections, last = key.split(".")
        node = cfg
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "pill.cli", *map(str, args)], capture_output=True, text=True,
                          env={**SUB_ENV, **(env or {})}, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"pill {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def weights(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "pill.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_stages_end_to_end(tmp_path, synth_root, feature_dir):
    from pill.build import load_run
    from pill.train.loop import train

    align = tiny_config(synth_root, feature_dir, stage="align")
    apply_overrides(align, ["data.prompt_format=QCM-A"])
    cfg1 = TrainConfig.from_dict(align)
    s1 = train(cfg1, tmp_path / "align", progress=False)
    assert s1["steps"] == 3  # 24 samples / batch 8
    files = sorted(p.name for p in (tmp_path / "align").iterdir())
    assert files == ["README.md", "checkpoints", "config.yaml", "gates.json", "metrics.jsonl", "pill.safetensors"]
    w1 = weights(tmp_path / "align")
    # stage 1 trains the projector and the image experts only
    assert all(k == "pill_projector.image.weight" or ".experts.1." in k for k in w1)
    d, L, r = 64, 2, 32
    assert sum(v.numel() for v in w1.values()) == s1["trainable"] == 1280 * d + L * 3 * d * r
    metrics = [json.loads(l) for l in (tmp_path / "align" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["stage"] == "align" for m in metrics)

    cfg2 = TrainConfig.from_dict(tiny_config(synth_root, feature_dir, init_from=str(tmp_path / "align")))
    s2 = train(cfg2, tmp_path / "finetune", progress=False)
    w2 = weights(tmp_path / "finetune")
    n_kv = 2
    assert s2["trainable"] == 1280 * d + L * (3 * 3 * d * r + d * n_kv)
    assert sum(v.numel() for v in w2.values()) == s2["trainable"]
    # the image experts started from stage 1 and moved on
    k = "llm.model.layers.0.post_attention_layernorm.pill_experts.experts.1.w_up.weight"
    assert not torch.equal(w1[k], w2[k])

    vlm = load_run(tmp_path / "finetune")
    assert vlm.run_info["stages"] == ["align", "finetune"]
    for name, t in vlm.pill_state_dict(trainable_only=False).items():
        if name in w2:
            assert torch.equal(t, w2[name])


def test_finished_run_is_not_overwritten(tmp_path, synth_root, feature_dir):
    from pill.train.loop import TrainingError, train

    cfg = TrainConfig.from_dict(tiny_config(synth_root, feature_dir))
    train(cfg, tmp_path / "run", max_steps=1, progress=False)
    with pytest.raises(TrainingError, match="already holds a finished run"):
        train(cfg, tmp_path / "run", max_steps=1, progress=False)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, synth_root, feature_dir):
    cfg = tiny_config(synth_root, feature_dir, **{"optim.epochs": 6, "train.save_every": 3})
    path = write_config(tmp_path / "cfg.yaml", cfg)
    run_cli("train", path, "--output", tmp_path / "straight")

    victim = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pill.cli", "train", str(path), "--output", str(victim)],
                            cwd=ROOT, env=SUB_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any((victim / "checkpoints").glob("step-*/COMPLETE")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (victim / "pill.safetensors").exists()
    out = run_cli("train", path, "--output", victim, "--resume")
    assert "resuming from" in out.stdout
    assert max_diff(weights(victim), weights(tmp_path / "straight")) <= 1e-6
    steps = [json.loads(l)["step"] for l in (victim / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 18


def test_two_processes_match_one(tmp_path, synth_root, feature_dir):
    cfg = tiny_config(synth_root, feature_dir, **{"optim.epochs": 2})
    path = write_config(tmp_path / "cfg.yaml", cfg)
    run_cli("train", path, "--output", tmp_path / "one")
    port = 29500 + os.getpid() % 1000
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(port), "-m", "pill.cli", "train", str(path),
                           "--output", str(tmp_path / "two")],
                          capture_output=True, text=True, cwd=ROOT, env={**SUB_ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout + proc.stderr
    assert max_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-5


def test_feature_cache_gives_the_same_weights(tmp_path, synth_root, feature_dir):
    from pill.train.loop import train

    with_cache = TrainConfig.from_dict(tiny_config(synth_root, tmp_path / "cache"))
    without = TrainConfig.from_dict(tiny_config(synth_root, tmp_path / "cache", **{"train.feature_cache": False}))
    train(with_cache, tmp_path / "cached", max_steps=2, progress=False)
    cache_files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert cache_files, "the cache was not written"
    train(without, tmp_path / "plain", max_steps=2, progress=False)
    assert max_diff(weights(tmp_path / "cached"), weights(tmp_path / "plain")) <= 1e-5


def test_feature_cache_invalidation(tmp_path, synth_root):
    from PIL import Image

    from pill.data import content_key
    from pill.train.features import FeatureCache
    from pill.encoders.efficientnet import EfficientNetVPG

    torch.manual_seed(0)
    vpg = EfficientNetVPG(pretrained=False, pool=1)
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(img)
    cache = FeatureCache(tmp_path / "c", vpg)
    k1 = content_key(str(img))
    assert cache.build({k1: str(img)}, progress=False) == 1
    assert cache.build({k1: str(img)}, progress=False) == 0  # already there
    Image.new("RGB", (32, 32), (0, 0, 255)).save(img)  # the file changes: a new key, recomputed
    k2 = content_key(str(img))
    assert k2 != k1 and k2 not in cache
    torch.manual_seed(1)
    other = FeatureCache(tmp_path / "c", EfficientNetVPG(pretrained=False, pool=1))
    assert other.dir != cache.dir and k1 not in other  # another VPG never sees these entries
    with torch.no_grad():
        direct = vpg(vpg.preprocess([Image.new("RGB", (32, 32), (255, 0, 0))]))
    assert torch.allclose(FeatureCache(tmp_path / "c", vpg).get([k1]), direct, atol=1e-6)


def test_runs_sharing_a_feature_cache_keep_each_others_entries(tmp_path):
    from PIL import Image

    from pill.data import content_key
    from pill.train.features import FeatureCache
    from pill.encoders.efficientnet import EfficientNetVPG

    torch.manual_seed(0)
    vpg = EfficientNetVPG(pretrained=False, pool=1)
    paths = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (32, 32), color).save(paths[-1])
    k1, k2 = content_key(paths[0]), content_key(paths[1])
    a, b = FeatureCache(tmp_path / "c", vpg), FeatureCache(tmp_path / "c", vpg)  # two runs open the cache
    assert a.build({k1: paths[0]}, progress=False) == 1
    assert b.build({k2: paths[1]}, progress=False) == 1  # b's index write keeps a's entry
    assert k1 in FeatureCache(tmp_path / "c", vpg) and k2 in FeatureCache(tmp_path / "c", vpg)
    assert a.build({k2: paths[1]}, progress=False) == 0  # a finds b's entry instead of recomputing it
    assert torch.equal(a.get([k2]), b.get([k2])) and torch.equal(b.get([k1]), a.get([k1]))


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, synth_root, feature_dir):
    from pill.train.loop import TrainingError, fit, setup

    cfg = TrainConfig.from_dict(tiny_config(synth_root, feature_dir, **{"optim.epochs": 3}))
    s = setup(cfg, tmp_path / "run", progress=False)
    calls = {"n": 0}
    original = s.model.forward

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 2 * 3:  # steps 1-3 are fine (2 micro-batches each), then NaN
            out.loss_sum = out.loss_sum * float("nan")
        return out

    s.model.forward = poisoned
    with pytest.raises(TrainingError, match="step 4: loss is nan"):
        fit(s, progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000002"]
    assert not (tmp_path / "run" / "pill.safetensors").exists()


def test_init_from_another_base_model_is_refused(tmp_path, synth_root, feature_dir):
    from pill.train.loop import train

    cfg = TrainConfig.from_dict(tiny_config(synth_root, feature_dir))
    train(cfg, tmp_path / "llama", max_steps=1, progress=False)
    other = TrainConfig.from_dict(tiny_config(synth_root, feature_dir, **{"model.llm": "qwen2",
                                                                          "init_from": str(tmp_path / "llama")}))
    with pytest.raises(CheckpointError, match="different base model"):
        train(other, tmp_path / "qwen", max_steps=1, progress=False)


@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1", "'lrr'"),
    ("optim.lr=-1", "optim.lr"),
    ("stage=pretrain", "stage"),
    ("pill.gate=everywhere", "pill.gate"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("data.prompt_format=QXM-A", "prompt_format"),
    ("data.wrong_answer_p=2", "wrong_answer_p"),
    ("model.vpg=clip", "vpg_path"),
])
def test_config_errors_name_the_field(tmp_path, synth_root, feature_dir, override, field):
    path = write_config(tmp_path / "c.yaml", tiny_config(synth_root, feature_dir))
    with pytest.raises(ConfigError, match=field):
        load_config(path, [override])


def test_cli_reports_config_errors_cleanly(tmp_path, synth_root, feature_dir):
    path = write_config(tmp_path / "c.yaml", tiny_config(synth_root, feature_dir))
    proc = run_cli("train", path, "--set", "optim.batchsize=3", check=False)
    assert proc.returncode == 1
    assert "unknown field 'batchsize'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.stage in ("align", "finetune")
    if "paper" in path.parts:  # the numbers of each stage: tests/test_paper.py
        assert cfg.pill.r == 32 and cfg.model.llm.startswith("meta-llama/Llama-2-7b")


def test_mixed_llava_data_and_gate_learning_rate(tmp_path, synth_root, feature_dir):
    from pill.train.loop import setup

    plain = setup(TrainConfig.from_dict(tiny_config(synth_root, feature_dir)), tmp_path / "a", progress=False)
    mixed_cfg = tiny_config(synth_root, feature_dir, **{"data.mix_llava_json": str(synth_root / "captions_llava.json"),
                                                        "data.mix_image_folder": str(synth_root / "images"),
                                                        "optim.gate_lr_scale": 10.0,
                                                        "optim.projector_lr_scale": 0.25})
    mixed = setup(TrainConfig.from_dict(mixed_cfg), tmp_path / "b", progress=False)
    assert len(mixed.dataset) == len(plain.dataset) + 24  # one caption per training image
    limited = setup(TrainConfig.from_dict({**mixed_cfg, "data": {**mixed_cfg["data"], "mix_limit": 10}}),
                    tmp_path / "c", progress=False)
    assert len(limited.dataset) == len(plain.dataset) + 10
    base = mixed_cfg["optim"]["lr"]
    named = dict(mixed.vlm.named_parameters())
    lr_of = {id(p): g["lr"] for g in mixed.optimizer.param_groups for p in g["params"]}
    for n, p in named.items():
        if p.requires_grad:
            want = 10 * base if ".pill_gate." in n else 0.25 * base if n.startswith("pill_projector.") else base
            assert lr_of[id(p)] == pytest.approx(want), n


def test_system_prompt_travels_from_training_to_eval_and_chat(tmp_path, synth_root, feature_dir, monkeypatch):
    from pill.eval.evaluate import evaluate_scienceqa
    from pill.eval.run_commands import ChatSession
    from pill.build import load_run
    from pill.train.loop import load_dataset_samples, train

    cfg = TrainConfig.from_dict(tiny_config(synth_root, feature_dir, **{"data.system_prompt": "Look closely."}))
    samples = load_dataset_samples(cfg, progress=False)
    assert all(s.messages[0] == {"role": "system", "content": "Look closely."} for s in samples)
    train(cfg, tmp_path / "run", max_steps=1, progress=False)
    vlm = load_run(tmp_path / "run")
    assert vlm.system_prompt == "Look closely."

    res = evaluate_scienceqa(vlm, synth_root, "test", prompt_format="QCM-A", limit=2, max_new_tokens=2,
                             out_dir=tmp_path / "eval", system_prompt=vlm.system_prompt, progress=False)
    prompts = [json.loads(l)["prompt"] for l in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert res["count"] == 2 and all("Look closely." in p for p in prompts)

    seen = []
    real_generate = vlm.generate
    monkeypatch.setattr(vlm, "generate", lambda **kw: seen.append(kw["input_ids"]) or real_generate(**kw))
    ChatSession(vlm, max_new_tokens=1).ask("What is it?")
    vlm.chat("What is it?", max_new_tokens=1)
    ChatSession(vlm, max_new_tokens=1, system_prompt="Be brief.").ask("What is it?")
    texts = [vlm.tokenizer.decode(ids[0]) for ids in seen]
    assert "Look closely." in texts[0] and "Look closely." in texts[1]
    assert "Be brief." in texts[2] and "Look closely." not in texts[2]


@pytest.mark.parametrize("feature_cache", [True, False])
def test_feature_norm_is_fitted_on_training_images_and_kept_by_the_next_stage(tmp_path, synth_root, feature_dir,
                                                                              feature_cache):
    from pill.build import load_run
    from pill.train.loop import train

    model = {"model.vpg_layer": 10, "model.pool": 3, "model.feature_norm": True, "train.feature_cache": feature_cache}
    align = tiny_config(synth_root, feature_dir, stage="align", **model)
    train(TrainConfig.from_dict(align), tmp_path / "align", max_steps=1, progress=False)
    w1 = weights(tmp_path / "align")
    assert int(w1["pill_feature_norm.image.count"]) == 24 * 9  # 24 training images x 3 x 3 tokens of block 10
    assert w1["pill_projector.image.weight"].shape[1] == w1["pill_feature_norm.image.mean"].numel() == 112
    # the statistics are those of the VPG's features of the training images
    from pill.data.images import load_image
    from pill.encoders.efficientnet import EfficientNetVPG

    torch.manual_seed(0)
    vpg = EfficientNetVPG(pretrained=False, pool=3, layer=10)
    qids = json.loads((synth_root / "pid_splits.json").read_text())["train"]
    imgs = [load_image(synth_root / "images" / "train" / q / "image.png") for q in qids]
    with torch.no_grad():
        f = vpg(vpg.preprocess(imgs)).reshape(-1, 112).double()
    assert torch.allclose(w1["pill_feature_norm.image.mean"].double(), f.mean(0), atol=1e-4)
    assert torch.allclose(w1["pill_feature_norm.image.std"].double(), f.std(0), rtol=1e-3, atol=1e-5)

    cfg2 = tiny_config(synth_root, feature_dir, init_from=str(tmp_path / "align"), **model)
    apply_overrides(cfg2, ["data.split=val"])  # other images: the statistics still come from stage 1
    train(TrainConfig.from_dict(cfg2), tmp_path / "finetune", max_steps=1, progress=False)
    w2 = weights(tmp_path / "finetune")
    for k in ("mean", "std", "count"):
        assert torch.equal(w1[f"pill_feature_norm.image.{k}"], w2[f"pill_feature_norm.image.{k}"])
    vlm = load_run(tmp_path / "finetune")
    assert vlm.vpg.name == "efficientnet-lite0-block10-pool3"
    assert torch.equal(vlm.pill_feature_norm["image"].mean, w1["pill_feature_norm.image.mean"])


@pytest.mark.parametrize("changes, field", [
    ({"model.vpg_layer": 16}, "vpg_layer"),
    ({"model.pool": 8}, r"pool: .*\(7 for vpg_layer None\)"),
    ({"model.pool": 15, "model.vpg_layer": 10}, r"\(14 for vpg_layer 10\)"),
])
def test_vpg_layer_and_pool_are_validated(synth_root, feature_dir, changes, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig.from_dict(tiny_config(synth_root, feature_dir, **changes))
    TrainConfig.from_dict(tiny_config(synth_root, feature_dir, **{"model.vpg_layer": 10, "model.pool": 14}))
