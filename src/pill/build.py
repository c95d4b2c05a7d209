"""The build layer: configs -> models, datasets and loaders, for every entry point.

Training, evaluation, ``pill chat``, ``pill serve``, the demo and ``pill features`` all build
their models and data here; none of them reaches into another's internals.

- :func:`build_vlm`: the :class:`~pill.vlm.PillVLM` a :class:`~pill.runconfig.TrainConfig` describes;
- :func:`load_dataset_samples`: the samples of its ``data`` section;
- :func:`load_run`: a finished run, its trained plug-ins loaded (every stage of its ``init_from`` chain);
- :func:`load_model`: a run, or the embedded default with untrained plug-ins.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import CheckpointError, ConfigError
from .runconfig import EncoderConfig, TrainConfig, load_config

UNTRAINED_NOTE = (
    "note: no --run given, so this is the embedded default model (SmolLM2-135M-Instruct + EfficientNet-Lite0) "
    "with untrained plug-ins: the image pathway has learned nothing yet and answers cannot use what an image "
    "shows. Train a run and pass --run DIR."
)


if TYPE_CHECKING:
    import torch


def load_encoder_from_config(enc: EncoderConfig, *, pretrained: bool = True) -> "torch.nn.Module":
    """The frozen encoder an :class:`~pill.runconfig.EncoderConfig` names."""
    from .encoders import load_encoder

    encoder = load_encoder(enc.name, enc.path, layer=enc.layer, pool=enc.pool, pretrained=pretrained,
                           max_seconds=enc.max_seconds)
    if enc.image_mean is not None:
        set_normalisation = getattr(encoder, "set_normalisation", None)
        if set_normalisation is None:
            raise ConfigError(f"image_mean, image_std: encoder {enc.name!r} does not read images")
        set_normalisation(enc.image_mean, enc.image_std)
    if enc.precision == "bf16" or (enc.precision == "auto" and _native_bf16()):
        import torch

        encoder.set_compute_dtype(torch.bfloat16)
    return encoder


def _native_bf16() -> bool:
    """Whether ``auto`` means bf16 here (:func:`pill.precision.resolve_precision`)."""
    from .precision import resolve_precision

    return resolve_precision("auto").mixed_precision == "bf16"


def build_vlm(cfg: TrainConfig, device: str = "cpu"):
    """The model a config describes: real weights, or tiny random ones with ``model.random_init``.

    One encoder per modality of ``cfg.model`` (:meth:`~pill.runconfig.ModelConfig.encoder_configs`:
    the image encoder, then ``model.encoders``)."""
    import torch

    from .models import build_llm_from_config, load_llm, load_tokenizer
    from .vlm import PillVLM

    m = cfg.model
    encs = m.encoder_configs()
    norms = [name for name, e in encs.items() if e.feature_norm]
    if m.random_init:
        torch.manual_seed(0)
        encoders = {name: load_encoder_from_config(e, pretrained=False) for name, e in encs.items()}
        llm = build_llm_from_config(m.llm, seed=0)
        torch.manual_seed(cfg.train.seed)
        return PillVLM(llm, None, load_tokenizer(), cfg.pill, encoders=encoders, feature_norms=norms).to(device)
    llm = load_llm(m.llm, dtype=getattr(torch, m.dtype), device=device)
    encoders = {name: load_encoder_from_config(e).to(device) for name, e in encs.items()}
    return PillVLM(llm, None, load_tokenizer(m.llm), cfg.pill, encoders=encoders, feature_norms=norms)


def load_dataset_samples(cfg: TrainConfig, progress: bool = True):
    """The configured samples (a :class:`~pill.data.SampleList`)."""
    from .data.llava import load_llava

    d = cfg.data
    if d.format == "scienceqa":
        from .data.scienceqa import load_scienceqa

        samples = load_scienceqa(d.root, d.split, prompt_format=d.prompt_format, use_caption=d.use_caption,
                                 skip_bad=d.skip_bad, limit=d.limit, progress=progress, system_prompt=d.system_prompt,
                                 allow_outside_root=d.allow_outside_root, prompt_style=d.prompt_style)
    else:
        samples = load_llava(d.json, d.image_folder or os.path.dirname(d.json), skip_bad=d.skip_bad, limit=d.limit,
                             progress=progress, system_prompt=d.system_prompt, allow_outside_root=d.allow_outside_root,
                             prompt_style=d.prompt_style)
    if d.mix_llava_json:
        extra = load_llava(d.mix_llava_json, d.mix_image_folder or os.path.dirname(d.mix_llava_json),
                           skip_bad=d.skip_bad, limit=d.mix_limit, progress=progress, system_prompt=d.system_prompt,
                           allow_outside_root=d.allow_outside_root, prompt_style=d.prompt_style)
        samples.extend(extra)
    return samples


def fingerprints(vlm) -> dict[str, str]:
    """Checkpoint metadata keys -> fingerprints of the base LLM and of every frozen encoder."""
    from .models import fingerprint_llm

    return {"llm_fingerprint": fingerprint_llm(vlm.llm), **vlm.encoder_fingerprints()}


def run_chain(run_dir: str | Path) -> list[Path]:
    """The run and the runs it started from (``init_from``), earliest first; a cycle is an error."""
    from .checkpoint import WEIGHTS

    chain: list[Path] = []
    cur: Optional[Path] = Path(run_dir)
    while cur is not None:
        if any(cur.resolve() == c.resolve() for c in chain):
            raise CheckpointError(f"{chain[-1]}: init_from leads back to {cur}, a loop of runs")
        if not (cur / "config.yaml").is_file():
            raise CheckpointError(f"{cur}: not a pill run directory (no config.yaml)")
        if not (cur / WEIGHTS).is_file():
            what = "the run has" if not chain else f"{chain[-1]} starts from it, but it has"
            raise CheckpointError(f"{cur}: {what} no {WEIGHTS} (did it finish? resume it with --resume)")
        chain.append(cur)
        c = load_config(cur / "config.yaml")
        cur = Path(c.init_from) if c.init_from else None
    return list(reversed(chain))


HUB_FILES = ["config.yaml", "pill.safetensors", "README.md", "gates.json"]


def resolve_run(run: str | Path) -> Path:
    """A local run folder as is; otherwise ``run`` is a Hub model repository id (``user/name``,
    optionally ``user/name@revision``), downloaded with ``huggingface_hub.snapshot_download``
    (only the files a run needs) into the Hub cache."""
    path = Path(run)
    text = str(run)
    repo, _, revision = text.partition("@")
    if path.exists() or text.startswith((".", "/", "~")) or repo.count("/") != 1 or not all(repo.split("/")):
        return path  # a local path (run_chain names what is missing there)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, no such repository, no permission: one line
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{run}: not a local run directory, and the Hub did not provide it "
                              f"({type(e).__name__}: {reason[:300]})") from None


def _listed(names: list[str], most: int = 10) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def load_stage(vlm, path: str | Path, cfg: TrainConfig, expect: Optional[dict[str, str]] = None) -> dict:
    """Load the trained tensors of one finished stage (``path``: its ``pill.safetensors``) into ``vlm``,
    which ``cfg`` (the stage being built) describes; returns the file's metadata.

    Errors (:class:`~pill.errors.CheckpointError`): the fingerprints differ from ``expect``; the stage
    was trained with other plug-in or encoder settings (:data:`~pill.runconfig.STAGE_KEYS`, each listed
    old -> new); the file lacks a tensor its stage trains (each listed)."""
    from .checkpoint import load_weights
    from .runconfig import format_changes, stage_mismatches

    path = Path(path)
    tensors, meta = load_weights(path, expect)
    stored = meta.get("config")
    if not isinstance(stored, dict) and (path.parent / "config.yaml").is_file():
        stored = load_config(path.parent / "config.yaml").to_dict()
    if isinstance(stored, dict):
        changed = stage_mismatches(stored, cfg.to_dict())
        if changed:
            raise CheckpointError(f"{path}: trained with other plug-in or encoder settings than {cfg.stage} "
                                  f"uses: {format_changes(changed)} (the earlier stage's value first)")
    stage = meta.get("stage") if meta.get("stage") in ("align", "finetune") else \
        (stored or {}).get("stage", cfg.stage)
    loaded = set(vlm.load_pill_state_dict(tensors))
    vlm.set_stage(stage)
    expected = vlm.pill_state_names()
    missing = [n for n in expected if n not in loaded]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} of the {len(expected)} tensors its {stage} stage trains "
                              f"are missing: {_listed(missing)}")
    return meta


def check_run_config(run_dir: str | Path, cfg: TrainConfig) -> None:
    """``run_dir/config.yaml`` (read as ``cfg``) must be the config its ``pill.safetensors`` was trained
    with (stored in its metadata), up to the keys a resumed run may change
    (:data:`~pill.runconfig.RESUME_SAFE_KEYS`); a damaged or edited file is a CheckpointError that
    lists the keys that differ."""
    from .checkpoint import WEIGHTS, read_metadata
    from .runconfig import config_changes, format_changes

    stored = read_metadata(Path(run_dir) / WEIGHTS).get("config")
    if not isinstance(stored, dict):
        return  # written without its config (by a script): nothing to compare with
    changed, _ = config_changes(stored, cfg.to_dict())
    if changed:
        raise CheckpointError(f"{Path(run_dir) / 'config.yaml'}: differs from the config {WEIGHTS} was trained with: "
                              f"{format_changes(changed)} (trained value first)")


def load_run(run_dir: str | Path, device: str = "cpu", dtype: Optional["torch.dtype"] = None):
    """Rebuild the model of a finished training run and load its trained plug-ins.

    ``run_dir``: a run folder, or a Hub model repository id (``user/name``, see :func:`resolve_run`)
    that ``pill push`` uploaded. Reads ``config.yaml`` (models, plug-in config) and
    ``pill.safetensors``; the checkpoint's fingerprints must match the base LLM and encoders loaded
    now, and it must hold every tensor its stage trains (:func:`load_stage`). When the run started
    from an earlier stage (``init_from``), tensors that this stage did not train come from there.
    Sets ``vlm.run_info`` = {run_dir, stages, llm, vpg}, ``vlm.system_prompt`` (the run's
    ``data.system_prompt``), ``vlm.prompt_style`` and ``vlm.chat_template`` (the template of that
    style; None: the tokenizer's own).
    """
    from .checkpoint import WEIGHTS
    from .data.prompts import style_template

    run_dir = resolve_run(run_dir)
    chain = run_chain(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    check_run_config(run_dir, cfg)
    if dtype is not None:
        cfg.model.dtype = str(dtype).replace("torch.", "")
    vlm = build_vlm(cfg, device=device)
    expect = fingerprints(vlm)
    stages = []
    for d in chain:  # earliest stage first; later stages overwrite what they trained
        meta = load_stage(vlm, d / WEIGHTS, cfg, expect)
        stages += meta.get("stages") or [meta.get("stage", "?")]  # an exported run merges its stages
    vlm.set_stage(cfg.stage)
    vlm.eval()
    vlm.run_info = {"run_dir": str(run_dir), "stages": stages, "llm": cfg.model.llm, "vpg": cfg.model.vpg}
    vlm.system_prompt = cfg.data.system_prompt  # chat as the run was trained
    vlm.prompt_style = cfg.data.prompt_style
    vlm.chat_template = style_template(cfg.data.prompt_style)  # None: the tokenizer's own
    return vlm


def load_model(run: Optional[str] = None, device: str = "cpu", *, quiet: bool = False):
    """The model of ``run`` (:func:`load_run`), or, with no run, the embedded default
    (SmolLM2-135M-Instruct + EfficientNet-Lite0) with untrained plug-ins, after printing a note
    that says so (unless ``quiet``)."""
    import sys

    if run:
        return load_run(run, device=device)
    from .vlm import PillVLM

    if not quiet:
        print(UNTRAINED_NOTE, file=sys.stderr)
    return PillVLM.from_pretrained(device=device).eval()


__all__ = ["build_vlm", "load_dataset_samples", "load_run", "load_stage", "resolve_run", "load_model", "run_chain",
           "fingerprints",
           "load_encoder_from_config", "UNTRAINED_NOTE"]
