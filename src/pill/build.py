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

from .errors import CheckpointError
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

    return load_encoder(enc.name, enc.path, layer=enc.layer, pool=enc.pool, pretrained=pretrained,
                        max_seconds=enc.max_seconds)


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
                                 skip_bad=d.skip_bad, limit=d.limit, progress=progress, system_prompt=d.system_prompt)
    else:
        samples = load_llava(d.json, d.image_folder or os.path.dirname(d.json), skip_bad=d.skip_bad, limit=d.limit,
                             progress=progress, system_prompt=d.system_prompt)
    if d.mix_llava_json:
        extra = load_llava(d.mix_llava_json, d.mix_image_folder or os.path.dirname(d.mix_llava_json),
                           skip_bad=d.skip_bad, limit=d.mix_limit, progress=progress, system_prompt=d.system_prompt)
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


def load_run(run_dir: str | Path, device: str = "cpu", dtype: Optional["torch.dtype"] = None):
    """Rebuild the model of a finished training run and load its trained plug-ins.

    Reads ``run_dir/config.yaml`` (models, plug-in config) and ``run_dir/pill.safetensors``; the
    checkpoint's fingerprints must match the base LLM and encoders loaded now. When the run started
    from an earlier stage (``init_from``), tensors that this stage did not train come from there.
    Sets ``vlm.run_info`` = {run_dir, stages, llm, vpg} and ``vlm.system_prompt`` (the run's
    ``data.system_prompt``).
    """
    from .checkpoint import WEIGHTS, load_weights

    run_dir = Path(run_dir)
    chain = run_chain(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if dtype is not None:
        cfg.model.dtype = str(dtype).replace("torch.", "")
    vlm = build_vlm(cfg, device=device)
    expect = fingerprints(vlm)
    stages = []
    for d in chain:  # earliest stage first; later stages overwrite what they trained
        tensors, meta = load_weights(d / WEIGHTS, expect)
        vlm.load_pill_state_dict(tensors)
        stages.append(meta.get("stage", "?"))
    vlm.set_stage(cfg.stage)
    vlm.eval()
    vlm.run_info = {"run_dir": str(run_dir), "stages": stages, "llm": cfg.model.llm, "vpg": cfg.model.vpg}
    vlm.system_prompt = cfg.data.system_prompt  # chat as the run was trained
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


__all__ = ["build_vlm", "load_dataset_samples", "load_run", "load_model", "run_chain", "fingerprints",
           "load_encoder_from_config", "UNTRAINED_NOTE"]
