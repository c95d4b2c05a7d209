"""One training loop for both stages, on Hugging Face accelerate.

``setup()`` builds the model, data and optimizer from a :class:`TrainConfig`; ``fit()`` runs
the optimizer steps. The order of samples and the global batch depend only on the seed
and the epoch, never on the number of processes: each global batch is split across the
processes, and every process scales its summed token loss by (processes / answer tokens
in the global batch), so the averaged gradient equals the single-process one.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .. import __version__
from ..errors import CheckpointError, PillError
from ..plug import parameter_groups
from ..precision import Precision, resolve_precision
from ..build import build_vlm, fingerprints as model_fingerprints, load_dataset_samples
from ..data import content_key, image_key
from ..data.collate import batch_refs
from ..processor import IGNORE_INDEX
from ..checkpoint import (WEIGHTS, list_checkpoints, load_resume_state, load_weights, rng_state,
                         save_resume_state, save_weights, set_rng_state)
from ..runconfig import TrainConfig, check_inputs, save_config


if TYPE_CHECKING:
    import accelerate

    from ..data.collate import Collator, LengthGroupedBatchSampler, PillDataset
    from ..vlm import PillVLM
    from .features import FeatureCache


class TrainingError(PillError):
    """The run cannot go on (non-finite loss, empty data, ...); the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Setup:
    """Everything one training run needs, built by :func:`setup` and used by :func:`fit`."""

    cfg: TrainConfig
    run_dir: Path
    accelerator: "accelerate.Accelerator"
    vlm: "PillVLM"
    model: torch.nn.Module  # the module that is called: ``vlm``, wrapped by accelerate when distributed
    dataset: "PillDataset"
    sampler: "LengthGroupedBatchSampler"
    collator: "Collator"
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    features: dict[str, "FeatureCache"] = field(default_factory=dict)  # modality -> cache (empty: no cache)
    feature_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # modality -> input ref -> cache key
    steps_per_epoch: int = 0
    total_steps: int = 0
    fingerprints: dict[str, str] = field(default_factory=dict)
    precision: Optional[Precision] = None


def setup(cfg: TrainConfig, run_dir: str | Path, *, vlm=None, progress: bool = True) -> Setup:
    """Build everything a run needs. ``vlm``: a ready model (tests pass tiny ones)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from ..data.collate import Collator, LengthGroupedBatchSampler, PillDataset

    # accelerate keeps its state per process; a later stage in the same single process (pill demo,
    # a notebook) may use another precision, so start from a clean state there.
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    # cpu=True on machines without CUDA makes accelerate use gloo when launched with several processes.
    precision = resolve_precision(cfg.train.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    run_dir = Path(run_dir)
    seed_everything(cfg.train.seed)
    if vlm is None:
        vlm = build_vlm(cfg, device=str(accelerator.device))
    fingerprints = model_fingerprints(vlm)
    if cfg.init_from:
        src = Path(cfg.init_from) / WEIGHTS
        if not src.is_file():
            raise CheckpointError(f"init_from: {src} not found (is {cfg.init_from} a finished pill run?)")
        tensors, _ = load_weights(src, fingerprints)
        vlm.load_pill_state_dict(tensors)
    vlm.set_stage(cfg.stage)
    if cfg.train.gradient_checkpointing:
        vlm.enable_gradient_checkpointing()
    else:
        vlm.enable_plugin_recompute(cfg.train.recompute_plugins)
    if cfg.train.compile:
        vlm.compile_layers()

    samples = load_dataset_samples(cfg, progress=progress and accelerator.is_main_process)
    dataset = PillDataset(samples, vlm.processor, cfg.data.max_length, on_overflow=cfg.data.too_long,
                          skip_bad=cfg.data.skip_bad, wrong_answer_p=cfg.data.wrong_answer_p,
                          seed=cfg.train.seed, progress=progress and accelerator.is_main_process)
    if len(dataset) == 0:
        raise TrainingError(f"no training samples left in {cfg.data.root or cfg.data.json} (see the report above)")
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.optim.batch_size, seed=cfg.train.seed)
    features, feature_keys = {}, {}
    if cfg.train.feature_cache:
        features, feature_keys = prepare_features(cfg, vlm, dataset.samples, accelerator, progress)
    for name in vlm.feature_norms_to_fit():
        fit_feature_norm(vlm, dataset.samples, features.get(name), feature_keys.get(name), modality=name,
                         progress=progress and accelerator.is_main_process)
    collator = Collator(vlm.processor, load_images=not features)

    steps_per_epoch = len(sampler)
    total = cfg.optim.max_steps or steps_per_epoch * cfg.optim.epochs
    o = cfg.optim
    groups = {"decay": {"params": [], "weight_decay": o.weight_decay},
              "no_decay": {"params": [], "weight_decay": 0.0},
              "projector": {"params": [], "weight_decay": o.weight_decay, "lr": o.lr * o.projector_lr_scale},
              "gate": {"params": [], "weight_decay": 0.0, "lr": o.lr * o.gate_lr_scale}}
    gates = {id(p) for _, p in parameter_groups(vlm).get("gate", [])}
    for n, p in vlm.named_parameters():
        if p.requires_grad:
            kind = ("gate" if id(p) in gates else "projector" if n.startswith("pill_projector.")
                    else "decay" if p.ndim >= 2 else "no_decay")
            groups[kind]["params"].append(p)
    optimizer = torch.optim.AdamW([g for g in groups.values() if g["params"]], lr=o.lr, betas=tuple(o.betas))
    scheduler = _cosine(optimizer, int(o.warmup_ratio * total), total, o.min_lr_ratio)
    model, optimizer = accelerator.prepare(vlm, optimizer)
    return Setup(cfg, run_dir, accelerator, vlm, model, dataset, sampler, collator, optimizer, scheduler,
                 features, feature_keys, steps_per_epoch, total, fingerprints, precision)


def _cosine(optimizer, warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_features(cfg: TrainConfig, vlm, samples, accelerator=None, progress: bool = True):
    """Fill a feature cache per modality for every input of ``samples``; returns
    (modality -> cache, modality -> {input ref -> cache key})."""
    from .features import FeatureCache

    refs: dict[str, dict] = {name: {} for name in vlm.encoders}
    for s in samples:
        for name, items in s.inputs().items():
            for ref in items:
                refs[name][image_key(ref)] = (content_key(ref), ref)
    main = accelerator is None or accelerator.is_main_process
    caches = {}
    for name, enc in vlm.encoders.items():
        cache = FeatureCache(cfg.train.cache_dir, enc, load=vlm.modalities[name].load)
        if main:
            cache.build({k: ref for k, ref in refs[name].values()}, progress=progress)
        caches[name] = cache
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not main:
            caches = {name: FeatureCache(cfg.train.cache_dir, enc, load=vlm.modalities[name].load)
                      for name, enc in vlm.encoders.items()}
    return caches, {name: {ref: k for ref, (k, _) in r.items()} for name, r in refs.items()}


FEATURE_NORM_IMAGES = 1000


def fit_feature_norm(vlm, samples, features=None, feature_keys=None, *, modality: str = "image",
                     max_images: int = FEATURE_NORM_IMAGES, progress: bool = True) -> int:
    """Fit ``vlm.pill_feature_norm[modality]`` on the encoder features of the first ``max_images``
    distinct inputs of that modality in ``samples`` (from its feature cache when given). Returns
    the number of inputs."""
    from tqdm.auto import tqdm

    m = vlm.modalities[modality]
    if features is not None:  # the cache's keys: one per distinct input, in sample order
        refs = list(dict.fromkeys(feature_keys.values()))[:max_images]
    else:
        distinct = {(r if isinstance(r, str) else content_key(r)): r
                    for s in samples for r in s.inputs().get(modality, [])}
        refs = list(distinct.values())[:max_images]
    if not refs:
        raise TrainingError(f"model.feature_norm: the training samples have no {m.label}s to fit the feature "
                            "statistics on")
    B = 32
    enc = vlm.encoders[modality]

    def batches():
        for i in range(0, len(refs), B):
            chunk = refs[i:i + B]
            if features is not None:
                yield features.get(chunk)
            else:
                yield vlm.encode(modality, enc.preprocess([m.load(r) for r in chunk]))

    bar = tqdm(batches(), total=-(-len(refs) // B), desc="feature statistics", unit="batch",
               disable=not progress, leave=False)
    vectors = vlm.fit_feature_norm(bar, modality)
    if progress:
        print(f"feature_norm: per-channel statistics of {len(refs)} training {m.label}s ({vectors} feature vectors)")
    return len(refs)


def _label_tokens(encoded) -> int:
    return sum(1 for t in encoded.labels[1:] if t != IGNORE_INDEX)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def fit(s: Setup, *, resume: bool = False, max_steps: Optional[int] = None, progress: bool = True) -> dict:
    """Run the optimizer steps (continuing from the last checkpoint with ``resume``); returns a summary."""
    from tqdm.auto import tqdm

    cfg, acc, run_dir = s.cfg, s.accelerator, s.run_dir
    W, rank = acc.num_processes, acc.process_index
    main = acc.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    step, last_loss = 0, float("nan")
    if resume:
        ckpts = list_checkpoints(run_dir)
        if ckpts:
            tensors, state = load_resume_state(ckpts[-1])
            s.vlm.load_pill_state_dict(tensors)
            s.optimizer.load_state_dict(state["optimizer"])
            s.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
            step = state["step"]
            if main:
                print(f"resuming from {ckpts[-1]} (step {step})")
        elif main:
            print(f"--resume: no checkpoint in {run_dir}/checkpoints, starting from the beginning")
    total = min(s.total_steps, max_steps) if max_steps else s.total_steps
    metrics_path = run_dir / "metrics.jsonl"
    writer = _tensorboard(cfg, run_dir) if main else None
    meta = {"pill_version": __version__, "stage": cfg.stage, "model": cfg.model.llm, "vpg": cfg.model.vpg,
            "config": cfg.to_dict(), **s.fingerprints}
    if main:
        print(f"{cfg.stage}: {total} optimizer steps, global batch {cfg.optim.batch_size}, world size {W}, "
              f"{s.vlm.num_trainable():,} trainable parameters -> {run_dir}", flush=True)
        if s.precision is not None:
            print(f"precision: {s.precision.describe()}", flush=True)
    bar = tqdm(total=total, initial=step, desc=f"{cfg.stage}", unit="step", disable=not (progress and main))
    s.model.train()
    t_start, tokens_seen = time.time(), 0
    while step < total:
        epoch, pos = divmod(step, s.steps_per_epoch)
        s.dataset.set_epoch(epoch)
        batches = s.sampler.batches(epoch)
        global_batch = batches[pos]
        loss_sum, n_tok, seq_tok = _train_step(s, global_batch, W, rank)
        if not math.isfinite(loss_sum):
            raise TrainingError(f"step {step + 1}: loss is {loss_sum}; stopping. The last good checkpoint is "
                                f"kept in {run_dir}/checkpoints (lower optim.lr or check the data)")
        if cfg.optim.grad_clip:
            acc.clip_grad_norm_([p for p in s.vlm.parameters() if p.requires_grad], cfg.optim.grad_clip)
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = loss_sum / max(n_tok, 1)
        tokens_seen += seq_tok
        lr = s.scheduler.get_last_lr()[0]
        if main:
            elapsed = time.time() - t_start
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total:
                rec = {"step": step, "epoch": epoch, "stage": cfg.stage, "loss": last_loss, "lr": lr,
                       "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "elapsed_s": elapsed}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if writer is not None:
                    writer.add_scalar("loss", last_loss, step)
                    writer.add_scalar("lr", lr, step)
        if step % cfg.train.save_every == 0 and step < total:
            _save_resume(s, step, meta)
    bar.close()
    acc.wait_for_everyone()
    if main:
        save_weights(run_dir / WEIGHTS, s.vlm.pill_state_dict(), {**meta, "step": step})
        if writer is not None:
            writer.close()
    return {"run_dir": str(run_dir), "steps": step, "final_loss": last_loss, "trainable": s.vlm.num_trainable()}


def _save_resume(s: Setup, step: int, meta: dict) -> None:
    rngs = s.accelerator.gather_for_metrics([rng_state()], use_gather_object=True) \
        if s.accelerator.num_processes > 1 else [rng_state()]
    if s.accelerator.is_main_process:
        state = {"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(), "rng": rngs,
                 "step": step}
        save_resume_state(s.run_dir, step, s.vlm.pill_state_dict(), {**meta, "step": step}, state,
                          s.cfg.train.keep_last)
    s.accelerator.wait_for_everyone()


def _train_step(s: Setup, global_batch: list[int], W: int, rank: int) -> tuple[float, int, int]:
    """Forward/backward of this process's share of one global batch. Returns the global
    (loss sum, answer tokens, sequence tokens)."""
    acc = s.accelerator
    items_all = [s.dataset[i] for i in global_batch]
    n_global = sum(_label_tokens(it["encoded"]) for it in items_all)
    mine = items_all[rank::W]
    per_rank = -(-len(items_all) // W)
    m = s.cfg.optim.micro_batch_size
    n_micro = max(1, -(-per_rank // m))
    local_loss = 0.0
    seq_tokens = 0
    for j in range(n_micro):
        chunk = mine[j * m:(j + 1) * m]
        dummy = not chunk  # this process has no sample left: run one with zero weight to keep DDP in step
        if dummy:
            chunk = items_all[:1]
        batch = _to_device(s.collator(chunk), acc.device)
        for name, refs in batch_refs(batch).items():
            if name in s.features:
                keys = [s.feature_keys[name][r] for r in refs]
                batch[s.vlm.modalities[name].features_key] = s.features[name].get(keys).to(acc.device)
        for mod in s.vlm.modalities.values():
            batch.pop(mod.refs_key, None)
        batch.pop("ids", None)
        sync = j == n_micro - 1
        ctx = acc.no_sync(s.model) if not sync and W > 1 else _null()
        with ctx, acc.autocast():
            out = s.model(**batch)
            scale = 0.0 if dummy else W / max(n_global, 1)
            loss = out.loss_sum * scale
        acc.backward(loss)
        if not dummy:
            local_loss += float(out.loss_sum.detach())
            seq_tokens += int(batch["attention_mask"].sum())
    if W > 1:
        t = torch.tensor([local_loss, float(seq_tokens)], device=acc.device, dtype=torch.float64)
        t = acc.reduce(t, reduction="sum")
        local_loss, seq_tokens = float(t[0]), int(t[1])
    return local_loss, n_global, seq_tokens


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _tensorboard(cfg: TrainConfig, run_dir: Path):
    if not cfg.train.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError("train.tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(cfg: TrainConfig, output_dir: str | Path | None = None, *, resume: bool = False,
          max_steps: Optional[int] = None, vlm=None, progress: bool = True) -> dict:
    """Set up and run one stage; returns a summary with the run directory."""
    run_dir = Path(output_dir or cfg.train.output_dir or "runs/pill")
    if not resume and (run_dir / WEIGHTS).is_file():
        raise TrainingError(f"{run_dir} already holds a finished run; choose another --output or pass --resume")
    if not resume and list_checkpoints(run_dir):
        raise TrainingError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it "
                            "or choose another --output")
    check_inputs(cfg)  # before any model is loaded
    s = setup(cfg, run_dir, vlm=vlm, progress=progress)
    return fit(s, resume=resume, max_steps=max_steps, progress=progress)
