"""Experiment tracking through Hugging Face accelerate's trackers (``train.report_to``).

accelerate owns the trackers (TensorBoard, Weights & Biases, MLflow, ...): the training loop
passes ``report_to`` as ``Accelerator(log_with=...)`` and logs dictionaries of scalars with
``accelerator.log``. This module checks, before any model is loaded, that each tracker's
package is installed, flattens the run config into the scalar hyper-parameters trackers
accept, and names the scalars the loop logs:

- every ``log_every`` steps: ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``train/grad_norm``;
- at every save and at the end: ``gates/layer_NN`` (mean |tanh(gate)| of the layer over the
  non-text tokens of a fixed batch of training samples) and ``gates/mean``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..runconfig import TrainConfig

PROJECT = "pill"  # the tracker project (W&B project, TensorBoard folder under <run>/logs)
LOGS = "logs"

# config name -> (accelerate's availability check, what to install)
_PACKAGES = {
    "tensorboard": ("is_tensorboard_available", "pip install tensorboard"),
    "wandb": ("is_wandb_available", "pip install 'pill[wandb]'"),
    "trackio": ("is_trackio_available", "pip install trackio"),
    "comet_ml": ("is_comet_ml_available", "pip install comet_ml"),
    "mlflow": ("is_mlflow_available", "pip install mlflow"),
    "aim": ("is_aim_available", "pip install aim"),
    "clearml": ("is_clearml_available", "pip install clearml"),
    "dvclive": ("is_dvclive_available", "pip install dvclive"),
    "swanlab": ("is_swanlab_available", "pip install swanlab"),
}


def check_trackers(cfg: TrainConfig) -> None:
    """Raise ConfigError naming ``train.report_to`` when a tracker's package is not installed."""
    import accelerate.utils

    for name in cfg.train.report_to:
        if name == "all":
            continue
        check, install = _PACKAGES[name]
        if not getattr(accelerate.utils, check)():
            raise ConfigError(f"train.report_to: {name} needs its package, which is not installed ({install})")


def logging_dir(run_dir: str | Path) -> Path:
    """Where the trackers that write files (TensorBoard, ...) keep them: ``<run>/logs``."""
    return Path(run_dir) / LOGS


def init_kwargs(cfg: TrainConfig, run_dir: Path) -> dict[str, dict]:
    """Per-tracker ``init_trackers`` arguments: W&B files go into the run, named after it."""
    kwargs: dict[str, dict] = {}
    if "wandb" in cfg.train.report_to or "all" in cfg.train.report_to:
        kwargs["wandb"] = {"dir": str(logging_dir(run_dir)), "name": f"{run_dir.name} ({cfg.stage})"}
    return kwargs


def hyperparameters(cfg: TrainConfig) -> dict[str, Any]:
    """The run config as flat ``section.field`` -> scalar (lists and None as text), which every
    tracker accepts (TensorBoard's hparams take no nested values)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    walk("", cfg.to_dict())
    return out


def step_scalars(loss: float, lr: float, tokens_per_s: float, grad_norm: float) -> dict[str, float]:
    return {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s, "train/grad_norm": grad_norm}


def gate_scalars(gates: dict) -> dict[str, float]:
    """``vlm.measure_gates(...)`` -> ``gates/layer_NN`` per plugged layer and ``gates/mean``."""
    values = gates["mean_abs_gate"]
    out = {f"gates/layer_{layer:02d}": float(v) for layer, v in zip(gates["layers"], values)}
    if values:
        out["gates/mean"] = float(sum(values) / len(values))
    return out
