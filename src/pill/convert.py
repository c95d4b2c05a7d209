"""Checkpoints of the reference PILL code (DsaltYfish/PILL) -> pill run directories.

The reference trains a LLaMA of its own (``model/llm_model.py``) and saves every parameter whose
name contains ``adapter`` (``utils/misc.py: save_model``), under ``"model"`` in a ``torch.save``
file, ``module.`` in front when it ran under DDP. Per decoder layer ``i``::

    layers.i.adapter_attn.{down_sampler_gate,down_sampler,up_sampler}.weight     A_attn  (r, d) (r, d) (d, r)
    layers.i.txt_adapter_ffn.{...}.weight                                        L-expert
    layers.i.vis_adapter_ffn.{...}.weight                                        V-expert
    layers.i.attention.vis_adapter_gate.weight                                   MAG W_gate (n_heads, d)

and ``vis_adapter_proj.weight`` (d, 768), the projector. Its ``GLUAdapter`` computes
``up_sampler(silu(down_sampler_gate(z)) * down_sampler(z))``: ``W_g, W_d, W_up`` of
:class:`pill.modules.SwiGLUAdapter`. The tensors go onto the plug-ins pill puts into the Hugging
Face model a config describes (:mod:`pill.plug`), with that model's fingerprints, so the result
loads like any trained run (:func:`pill.build.load_run`). Anything that does not fit is refused,
naming the tensor.
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Optional

import torch

from .errors import CheckpointError, ConfigError
from .modalities import IMAGE, TEXT

# the reference's adapter slots -> (pill wrapper kind, expert modality id or None)
ADAPTERS = {"adapter_attn": ("attn", None), "txt_adapter_ffn": ("ffn", TEXT), "vis_adapter_ffn": ("ffn", IMAGE)}
LINEARS = {"down_sampler_gate": "w_gate", "down_sampler": "w_down", "up_sampler": "w_up"}
GATE = "attention.vis_adapter_gate.weight"
PROJECTOR = "vis_adapter_proj.weight"
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def read_reference_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a reference checkpoint (``module.`` removed) and what else it says (``epoch``).

    Read with ``torch.load(weights_only=True)``: plain tensors and containers, plus the
    ``argparse.Namespace`` of the run's arguments that ``save_model`` stores; any other object
    in the file is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: holds objects other than tensors, refused "
                              f"({reason[0] if reason else 'unpickling error'})") from None
    except Exception as e:  # not a torch.save file at all
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: expected a state dict (or a dict with one under 'model'), "
                              f"got {type(obj).__name__}")
    tensors = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        key = name[len("module."):] if name.startswith("module.") else name
        tensors[key] = value
    info = {"epoch": obj["epoch"]} if isinstance(obj, dict) and isinstance(obj.get("epoch"), int) else {}
    return tensors, info


def _check_plugins(cfg) -> None:
    """The reference has SwiGLU adapters on the attention input, two FFN experts and a token gate in
    every layer: a config that plugs anything else cannot take its tensors."""
    p = cfg.pill
    wrong = [(f"pill.{k}", want, getattr(p, k)) for k, want in
             (("adapter", "swiglu"), ("attn_adapter", True), ("momae", True), ("mag", True), ("gate", "token"),
              ("layers", None))
             if getattr(p, k) != want]
    if wrong:
        field, want, got = wrong[0]
        raise ConfigError(f"{field}: the reference checkpoint needs {want!r} (its plug-ins), the config has {got!r}")
    extra = set(cfg.model.encoder_configs()) - {"image"}
    if extra:
        raise ConfigError(f"model.encoders: the reference checkpoint has an image projector only, "
                          f"the config adds {', '.join(sorted(extra))}")


def _layers(vlm) -> torch.nn.ModuleList:
    llm = vlm.llm
    return (llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model).layers


def reference_targets(vlm) -> dict[str, tuple[str, torch.nn.Parameter]]:
    """Reference tensor name -> (pill parameter name, parameter) for every tensor of a reference
    checkpoint, found on the plug-ins of ``vlm`` (a :class:`~pill.vlm.PillVLM`)."""
    from .plug import PillAttnInput, PillFFNInput, PillValueProj

    names = {id(p): n for n, p in vlm.named_parameters()}
    out: dict[str, tuple[str, torch.nn.Parameter]] = {}

    def add(ref: str, param: torch.nn.Parameter) -> None:
        out[ref] = (names[id(param)], param)

    for i, layer in enumerate(_layers(vlm)):
        for module in layer.modules():
            if isinstance(module, PillAttnInput):
                adapters = {"adapter_attn": module.pill_adapter}
            elif isinstance(module, PillFFNInput):
                experts = module.pill_experts.experts
                adapters = {"txt_adapter_ffn": experts[TEXT], "vis_adapter_ffn": experts[IMAGE]}
            elif isinstance(module, PillValueProj):
                add(f"layers.{i}.{GATE}", module.pill_gate.w_gate.weight)
                continue
            else:
                continue
            for slot, adapter in adapters.items():
                for ref_linear, ours in LINEARS.items():
                    add(f"layers.{i}.{slot}.{ref_linear}.weight", getattr(adapter, ours).weight)
    add(PROJECTOR, vlm.pill_projector["image"].weight)
    return out


def map_reference_state(tensors: dict[str, torch.Tensor], vlm, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Reference tensors -> pill tensors (float32), checked name by name and shape by shape against
    ``vlm``; CheckpointError names the first tensor that does not fit, or one that is missing."""
    targets = reference_targets(vlm)
    n_layers = len(_layers(vlm))
    out = {}
    for name, t in tensors.items():
        if name not in targets:
            m = _LAYER.fullmatch(name)
            if m and int(m.group(1)) >= n_layers:
                why = f"layer {m.group(1)}, but the model has {n_layers} layers (0..{n_layers - 1})"
            elif m:
                why = ("not a reference plug-in tensor (per layer: adapter_attn / txt_adapter_ffn / vis_adapter_ffn"
                       f" .{{down_sampler_gate,down_sampler,up_sampler}}.weight and {GATE})")
            else:
                why = f"not a reference plug-in tensor (expected layers.N.* or {PROJECTOR})"
            raise CheckpointError(f"{source}: tensor {name!r}: {why}")
        ours, param = targets[name]
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, but {ours} of the model "
                                  f"built from the config has {tuple(param.shape)} (check pill.r, the LLM and the VPG)")
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        out[ours] = t.detach().to(torch.float32).clone()
    missing = [ref for ref in targets if ref not in tensors]
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} of {len(targets)} "
                              "plug-in tensors the model needs are not in the checkpoint)")
    return out


def convert_reference(checkpoint: str | Path, out_dir: str | Path, cfg, *, stage: str = "finetune",
                      device: str = "cpu", vlm=None) -> dict:
    """Write the pill run ``out_dir`` (config.yaml + pill.safetensors) from a reference checkpoint.

    Args:
        checkpoint: a ``.pth`` file written by the reference code (``checkpoint-N.pth``).
        cfg: the :class:`~pill.runconfig.TrainConfig` whose ``model`` and ``pill`` sections describe
            the base LLM, the VPG and the plug-ins the checkpoint was trained on (the paper configs
            do); ``init_from`` is dropped, ``stage`` set.
        stage: ``finetune`` (a ScienceQA or instruction-tuned checkpoint) or ``align`` (CC595K).
        vlm: an already built model of ``cfg`` (tests); default :func:`pill.build.build_vlm`.
    Returns ``{"run_dir", "tensors", "stage", "epoch"}``.
    """
    from dataclasses import replace

    from . import __version__
    from .build import build_vlm, fingerprints
    from .checkpoint import WEIGHTS, save_weights
    from .runconfig import save_config

    if stage not in ("align", "finetune"):
        raise ConfigError(f"stage: must be 'align' or 'finetune', got {stage!r}")
    out_dir = Path(out_dir)
    if (out_dir / WEIGHTS).exists():
        raise CheckpointError(f"{out_dir} already holds a run ({WEIGHTS}); choose another --out")
    cfg = replace(cfg, stage=stage, init_from=None)
    _check_plugins(cfg)
    tensors, info = read_reference_checkpoint(checkpoint)  # before the (large) model is built
    if vlm is None:
        vlm = build_vlm(cfg, device=device)
    state = map_reference_state(tensors, vlm, str(checkpoint))
    vlm.load_pill_state_dict(state)
    vlm.set_stage(stage)
    meta = {"pill_version": __version__, "stage": stage, "model": cfg.model.llm, "vpg": cfg.model.vpg,
            "config": cfg.to_dict(), "converted_from": str(checkpoint), **info, **fingerprints(vlm)}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    save_weights(out_dir / WEIGHTS, state, meta)
    return {"run_dir": str(out_dir), "tensors": len(state), "stage": stage, "epoch": info.get("epoch")}


def default_config_path() -> Path:
    """The packaged paper config whose model the released ScienceQA checkpoint belongs to."""
    return Path(__file__).resolve().parent / "configs" / "paper" / "stage2_scienceqa.yaml"


def load_convert_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None):
    """The config a conversion builds its model from (default :func:`default_config_path`)."""
    from .runconfig import load_config

    return load_config(path or default_config_path(), overrides)


__all__ = ["read_reference_checkpoint", "reference_targets", "map_reference_state", "convert_reference",
           "default_config_path", "load_convert_config"]
