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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .. import __version__
from ..errors import CheckpointError, ConfigError, PillError
from ..io import write_atomic
from ..plug import parameter_groups
from ..precision import Precision, resolve_precision
from ..build import build_vlm, fingerprints as model_fingerprints, load_dataset_samples, load_stage, run_chain
from ..data import content_key, image_key
from ..data.collate import batch_refs
from ..processor import IGNORE_INDEX
from ..checkpoint import (WEIGHTS, list_checkpoints, load_resume_state, read_metadata, remove_stale_temporaries,
                         rng_state, save_resume_state, save_weights, set_rng_state)
from ..hub import write_model_card
from ..runconfig import (RESUME_SAFE_KEYS, TrainConfig, check_inputs, config_changes, format_changes, save_config,
                         stage_mismatches)
from . import tracking


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
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from ..data.collate import Collator, LengthGroupedBatchSampler, PillDataset

    # accelerate keeps its state per process; a later stage in the same single process (pill demo,
    # a notebook) may use another precision, so start from a clean state there.
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    # cpu=True on machines without CUDA makes accelerate use gloo when launched with several processes.
    precision = resolve_precision(cfg.train.mixed_precision)
    run_dir = Path(run_dir)
    accelerator = Accelerator(mixed_precision=precision.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                              log_with=cfg.train.report_to or None,
                              project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                  logging_dir=str(tracking.logging_dir(run_dir))))
    seed_everything(cfg.train.seed)
    if vlm is None:
        vlm = build_vlm(cfg, device=str(accelerator.device))
    fingerprints = model_fingerprints(vlm)
    if cfg.init_from:
        check_init_from(cfg, run_dir)
        load_stage(vlm, Path(cfg.init_from) / WEIGHTS, cfg, fingerprints)
    vlm.set_stage(cfg.stage)
    if cfg.train.gradient_checkpointing:
        vlm.enable_gradient_checkpointing()
    else:
        vlm.enable_plugin_recompute(cfg.train.recompute_plugins)
    if cfg.train.compile:
        vlm.compile_layers()

    main = accelerator.is_main_process
    samples = load_dataset_samples(cfg, progress=progress and main)
    features, feature_keys = {}, {}
    if cfg.train.feature_cache:
        features, feature_keys = prepare_features(cfg, vlm, samples, accelerator, progress)
    if cfg.data.skip_bad:
        samples = drop_unreadable_inputs(samples, vlm, features, feature_keys, report=progress and main)
    dataset = PillDataset(samples, vlm.processor, cfg.data.max_length, on_overflow=cfg.data.too_long,
                          skip_bad=cfg.data.skip_bad, wrong_answer_p=cfg.data.wrong_answer_p,
                          seed=cfg.train.seed, progress=progress and main)
    if len(dataset) == 0:
        raise TrainingError(f"no training samples left in {cfg.data.root or cfg.data.json} (see the report above)")
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.optim.batch_size, seed=cfg.train.seed)
    if cfg.stage == "align":
        vlm.set_stage(cfg.stage, align_modality=align_modality(vlm, dataset.samples))
    if features:  # the inputs of the samples kept, in their order (the feature statistics are fitted on these)
        feature_keys = {name: {r: keys[r] for s in dataset.samples for r in map(image_key, s.inputs().get(name, []))}
                        for name, keys in feature_keys.items()}
    for name in vlm.feature_norms_to_fit():
        fit_feature_norm(vlm, dataset.samples, features.get(name), feature_keys.get(name), modality=name,
                         progress=progress and accelerator.is_main_process)
    collator = Collator(vlm.processor, load_images=not features)

    steps_per_epoch = len(sampler)
    total = cfg.optim.max_steps or steps_per_epoch * cfg.optim.epochs
    o = cfg.optim
    lr = o.effective_lr  # optim.lr, or optim.base_lr scaled by the global batch
    groups = {"decay": {"params": [], "weight_decay": o.weight_decay},
              "no_decay": {"params": [], "weight_decay": 0.0},
              "projector": {"params": [], "weight_decay": o.weight_decay, "lr": lr * o.projector_lr_scale},
              "gate": {"params": [], "weight_decay": o.gate_weight_decay, "lr": lr * o.gate_lr_scale}}
    gates = {id(p) for _, p in parameter_groups(vlm).get("gate", [])}
    for n, p in vlm.named_parameters():
        if p.requires_grad:
            kind = ("gate" if id(p) in gates else "projector" if n.startswith("pill_projector.")
                    else "decay" if p.ndim >= 2 else "no_decay")
            groups[kind]["params"].append(p)
    optimizer = torch.optim.AdamW([g for g in groups.values() if g["params"]], lr=lr, betas=tuple(o.betas))
    scheduler = _cosine(optimizer, int(o.warmup_ratio * total), total, o.min_lr_ratio)
    model, optimizer = accelerator.prepare(vlm, optimizer)
    return Setup(cfg, run_dir, accelerator, vlm, model, dataset, sampler, collator, optimizer, scheduler,
                 features, feature_keys, steps_per_epoch, total, fingerprints, precision)


def align_modality(vlm, samples) -> str:
    """The modality whose expert takes the text tokens in the last layer while aligning: the one
    non-text modality the samples use, or ``image`` when they use images or several modalities."""
    used = {name for s in samples for name in s.inputs()}  # inputs() leaves out modalities without inputs
    return used.pop() if len(used) == 1 and used <= set(vlm.modalities) else "image"


def check_init_from(cfg: TrainConfig, run_dir: str | Path) -> None:
    """``init_from`` names a finished run other than ``run_dir`` whose own ``init_from`` chain ends
    (:func:`pill.build.run_chain`); raises ConfigError / CheckpointError."""
    src = Path(cfg.init_from)
    if src.resolve() == Path(run_dir).resolve():
        raise ConfigError(f"init_from: {src} is this run's own directory; name the finished run of the stage before")
    if not (src / WEIGHTS).is_file():
        raise CheckpointError(f"init_from: {src / WEIGHTS} not found (is {src} a finished pill run?)")
    run_chain(src)
    stored = read_metadata(src / WEIGHTS).get("config")
    changed = stage_mismatches(stored, cfg.to_dict()) if isinstance(stored, dict) else []
    if changed:
        raise CheckpointError(f"init_from: {src / WEIGHTS} was trained with other plug-in or encoder settings "
                              f"than this stage: {format_changes(changed)} (the earlier stage's value first)")


def _stored_config(run_dir: Path) -> Optional[tuple[Path, dict]]:
    """(file, config) the newest trained tensors of ``run_dir`` were written with: those of its last
    checkpoint, else of its ``pill.safetensors``; None when it has neither."""
    ckpts = list_checkpoints(run_dir)
    src = ckpts[-1] / WEIGHTS if ckpts else run_dir / WEIGHTS
    if not src.is_file():
        if ckpts:
            raise CheckpointError(f"{src}: missing, so {ckpts[-1].name} cannot be resumed (delete the folder to "
                                  "resume from the checkpoint before it)")
        return None
    stored = read_metadata(src).get("config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{src}: holds no training config to check the resumed run against")
    return src, stored


def check_resume(cfg: TrainConfig, run_dir: str | Path) -> list[str]:
    """Compare ``cfg`` with the config the run's newest tensors were trained with. A change that
    breaks the run (any key outside :data:`pill.runconfig.RESUME_SAFE_KEYS`) is a TrainingError
    listing each changed key, old -> new; returns one line per allowed change, to log."""
    run_dir = Path(run_dir)
    found = _stored_config(run_dir)
    if found is None:
        return []
    src, stored = found
    breaking, safe = config_changes(stored, cfg.to_dict())
    if breaking:
        raise TrainingError(f"{run_dir}: --resume with a config that changes the run it continues: "
                            f"{format_changes(breaking)} (stored in {src}); restore these values, or train "
                            "into a new --output")
    return [f"resume: {k} {old!r} -> {new!r} ({RESUME_SAFE_KEYS[k]})" for k, old, new in safe]


def _check_max_steps(max_steps) -> None:
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"max_steps: must be a whole number >= 1, got {max_steps!r}")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of ``metrics.jsonl`` up to ``step``: a resumed run logs the steps after it
    again. Unreadable lines (a write cut short) are dropped with a note."""
    if not path.is_file():
        return
    kept, dropped, unreadable = [], 0, 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and isinstance(rec.get("step"), int)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            unreadable += 1
        elif rec["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if unreadable:
        print(f"warning: {path}: dropped {unreadable} unreadable lines", file=sys.stderr)
    if dropped or unreadable:
        write_atomic(path, "".join(line + "\n" for line in kept))


def _last_good(run_dir: Path) -> str:
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return "No checkpoint was saved before it"
    return f"The last good checkpoint is kept: {ckpts[-1]} (continue from it with --resume)"


def _check_finite_weights(s: "Setup", step: int) -> None:
    """Stop when an optimizer step has left NaN or infinite values in a trained tensor: they are never saved."""
    params = [(n, p) for n, p in s.vlm.named_parameters() if p.requires_grad]
    if bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        return
    bad = [n for n, p in params if not bool(torch.isfinite(p).all())]
    raise TrainingError(f"step {step}: the optimizer step left NaN or infinite values in {len(bad)} trained tensors "
                        f"(e.g. {', '.join(bad[:3])}); stopping without saving them. {_last_good(s.run_dir)} "
                        "(lower optim.lr or check the data)")


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
            cache.build({k: ref for k, ref in refs[name].values()}, progress=progress, skip_bad=cfg.data.skip_bad)
        caches[name] = cache
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not main:
            caches = {name: FeatureCache(cfg.train.cache_dir, enc, load=vlm.modalities[name].load)
                      for name, enc in vlm.encoders.items()}
    return caches, {name: {ref: k for ref, (k, _) in r.items()} for name, r in refs.items()}


def drop_unreadable_inputs(samples, vlm, features=None, feature_keys=None, *, report: bool = True):
    """The samples whose every input can be read (``data.skip_bad``); the others are counted and
    reported (reason ``bad_image`` / ``bad_input``). With feature caches, an input is unreadable when
    building its cache left it out; without, each distinct input is decoded once here."""
    from ..data import LoadReport, SampleList

    bad: dict[str, str] = {}  # input ref -> message
    for name in vlm.encoders:
        m = vlm.modalities[name]
        if features:
            cache = features[name]
            cache.refresh()
            for ref, key in feature_keys[name].items():
                if key not in cache:
                    bad[ref] = cache.bad.get(key, f"{ref}: cannot read this {m.label}")
        else:
            seen = set()
            for s in samples:
                for x in s.inputs().get(name, []):
                    ref = image_key(x)
                    if ref in seen:
                        continue
                    seen.add(ref)
                    try:
                        m.load(x)
                    except PillError as e:
                        bad[ref] = str(e)
    rep = LoadReport(source=f"{getattr(getattr(samples, 'report', None), 'source', 'samples')} (inputs decoded)")
    kept = SampleList(report=getattr(samples, "report", None))
    for s in samples:
        rep.total += 1
        broken = [(name, image_key(x)) for name, xs in s.inputs().items() for x in xs if image_key(x) in bad]
        if broken:
            name, ref = broken[0]
            rep.skip("bad_image" if name == "image" else "bad_input", f"sample {s.id}: {bad[ref]}")
            continue
        kept.append(s)
    rep.kept = len(kept)
    if report:
        rep.print_if_skipped()
    return kept


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
    _check_max_steps(max_steps)
    notes = check_resume(cfg, run_dir) if resume else []  # before config.yaml is rewritten
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temporaries(run_dir)
        if stale:
            print(f"removed {len(stale)} temporary files of an interrupted save: {', '.join(p.name for p in stale)}")
        for line in notes:
            print(line)
        save_config(cfg, run_dir / "config.yaml")
    step, last_loss = 0, float("nan")
    if resume:
        ckpts = list_checkpoints(run_dir)
        if ckpts:
            tensors, state = load_resume_state(ckpts[-1], s.fingerprints)
            s.vlm.load_pill_state_dict(tensors)
            try:
                s.optimizer.load_state_dict(state["optimizer"])
                s.scheduler.load_state_dict(state["scheduler"])
                set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise CheckpointError(f"{ckpts[-1]}: the resume state does not fit this run "
                                      f"({type(e).__name__}: {e})") from None
            step = state["step"]
            if main:
                print(f"resuming from {ckpts[-1]} (step {step})")
        elif main:
            print(f"--resume: no checkpoint in {run_dir}/checkpoints, starting from the beginning")
    total = min(s.total_steps, max_steps) if max_steps else s.total_steps
    if step > total:
        raise TrainingError(f"{run_dir}: the last checkpoint is at step {step}, past the {total} steps asked for "
                            "(optim.max_steps, optim.epochs or --max-steps)")
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        _truncate_metrics(metrics_path, step)
    if cfg.train.report_to:
        acc.init_trackers(tracking.PROJECT, config=tracking.hyperparameters(cfg),
                          init_kwargs=tracking.init_kwargs(cfg, run_dir))
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
            raise TrainingError(f"step {step + 1}: loss is {loss_sum}; stopping. {_last_good(run_dir)} "
                                "(lower optim.lr or check the data)")
        # the norm before clipping (no grad_clip: an infinite bound, which leaves the gradients as they are)
        grad_norm = float(acc.clip_grad_norm_([p for p in s.vlm.parameters() if p.requires_grad],
                                              cfg.optim.grad_clip or math.inf))
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        step += 1
        _check_finite_weights(s, step)
        last_loss = loss_sum / max(n_tok, 1)
        tokens_seen += seq_tok
        lr = s.scheduler.get_last_lr()[0]
        if main:
            elapsed = time.time() - t_start
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total:
                tok_s = tokens_seen / max(elapsed, 1e-9)
                rec = {"step": step, "epoch": epoch, "stage": cfg.stage, "loss": last_loss, "lr": lr,
                       "tokens_per_s": tok_s, "grad_norm": grad_norm, "elapsed_s": elapsed}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if cfg.train.report_to:
                    acc.log(tracking.step_scalars(last_loss, lr, tok_s, grad_norm), step=step)
        if step % cfg.train.save_every == 0 and step < total:
            _save_resume(s, step, meta)
            if main and cfg.train.report_to:
                acc.log(tracking.gate_scalars(_measure_gates(s)), step=step)
    bar.close()
    acc.wait_for_everyone()
    if main:
        try:
            save_weights(run_dir / WEIGHTS, s.vlm.pill_state_dict(), {**meta, "step": step})
        except CheckpointError as e:
            raise TrainingError(f"step {step}: {e}. {_last_good(run_dir)}") from None
        gates = _measure_gates(s)
        if gates["layers"]:
            write_atomic(run_dir / "gates.json", json.dumps(gates))
        write_model_card(run_dir, plot=False)  # the run folder is a Hub model repository (pill push)
        if cfg.train.report_to:
            acc.log(tracking.gate_scalars(gates), step=step)
    if cfg.train.report_to:
        acc.end_training()
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
        batch = _model_batch(s, chunk)
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


def _model_batch(s: Setup, items: list) -> dict:
    """Collate dataset items into the model's keyword arguments, on the device; cached encoder
    features replace the raw inputs."""
    batch = _to_device(s.collator(items), s.accelerator.device)
    for name, refs in batch_refs(batch).items():
        if name in s.features:
            keys = [s.feature_keys[name][r] for r in refs]
            batch[s.vlm.modalities[name].features_key] = s.features[name].get(keys).to(s.accelerator.device)
    for mod in s.vlm.modalities.values():
        batch.pop(mod.refs_key, None)
    batch.pop("ids", None)
    return batch


def _measure_gates(s: Setup) -> dict:
    """Mean |tanh(gate)| per plugged layer (:meth:`PillVLM.measure_gates`) on the same few training
    samples every time (the first of the first epoch's first batch), so values compare across saves."""
    items = [s.dataset[i] for i in s.sampler.batches(0)[0][:s.cfg.optim.micro_batch_size]]
    with s.accelerator.autocast():
        return s.vlm.measure_gates(**_model_batch(s, items))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train(cfg: TrainConfig, output_dir: str | Path | None = None, *, resume: bool = False,
          max_steps: Optional[int] = None, vlm=None, progress: bool = True) -> dict:
    """Set up and run one stage; returns a summary with the run directory."""
    run_dir = Path(output_dir or cfg.train.output_dir or "runs/pill")
    _check_max_steps(max_steps)
    if not resume and (run_dir / WEIGHTS).is_file():
        raise TrainingError(f"{run_dir} already holds a finished run; choose another --output or pass --resume")
    if not resume and list_checkpoints(run_dir):
        raise TrainingError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it "
                            "or choose another --output")
    check_inputs(cfg)  # before any model is loaded
    tracking.check_trackers(cfg)
    if resume:
        check_resume(cfg, run_dir)
    if cfg.init_from:
        check_init_from(cfg, run_dir)
    s = setup(cfg, run_dir, vlm=vlm, progress=progress)
    return fit(s, resume=resume, max_steps=max_steps, progress=progress)
