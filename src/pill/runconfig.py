"""Training configs: YAML -> validated dataclasses. Unknown keys and bad values name the field."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from .config import PillConfig, from_dict, load_yaml, parse_override, to_dict
from .errors import ConfigError


@dataclass
class EncoderConfig:
    """The frozen encoder of one modality (:mod:`pill.modalities`)."""

    name: str  # a registered encoder, e.g. efficientnet-lite0
    path: Optional[str] = None  # checkpoint folder or hub id, for encoders that load one
    layer: Optional[int] = None  # which encoder layer gives the tokens, where the encoder has a choice
    pool: Optional[int] = None  # pool the encoder's token grid, where it has one
    feature_norm: bool = False  # standardise the features per channel before the projector
    # audio encoders: the window every clip is padded to, in seconds (longer clips are an error)
    max_seconds: Optional[float] = None
    # the dtype the frozen encoder computes in: float32, bf16 (autocast; its features are stored
    # and projected in float32), or auto: bf16 where the hardware has it natively, as for
    # train.mixed_precision (pill.precision). Cached features of each precision are kept apart.
    precision: Literal["float32", "bf16", "auto"] = "float32"
    # image encoders: normalise pixels with this per-channel mean / std instead of the checkpoint's
    image_mean: Optional[list[float]] = None
    image_std: Optional[list[float]] = None

    def __post_init__(self):
        _check_normalisation(self.image_mean, self.image_std)


def _check_normalisation(mean: Optional[list[float]], std: Optional[list[float]]) -> None:
    if (mean is None) != (std is None):
        raise ConfigError("image_mean and image_std: set both or neither")
    if mean is None:
        return
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"image_mean and image_std: three values each (R, G, B), got {mean} and {std}")
    if any(v <= 0 for v in std):
        raise ConfigError(f"image_std: must be > 0, got {std}")


@dataclass
class ModelConfig:
    """Which frozen models to plug together. ``vpg*``, ``pool`` and ``feature_norm`` set the image
    encoder; ``encoders`` adds the encoders of further modalities, by modality name. ``vpg: null``:
    no image encoder (a model of other modalities only, e.g. audio; ``encoders`` then names one)."""

    llm: str = "smollm2-135m-instruct"  # embedded default, HF folder or hub id
    vpg: Optional[str] = "efficientnet-lite0"  # a registered encoder (pill.encoders.encoder_names()), or null
    vpg_path: Optional[str] = None  # checkpoint folder or hub id, for the encoders that need one (BLIP-2, CLIP, DINOv2)
    pool: Optional[int] = None  # EfficientNet only: pool the feature grid to pool x pool tokens
    # Which VPG layer gives the tokens. EfficientNet: a block index 0-15 (null: the head, 7x7x1280;
    # 10: 14x14x112); CLIP, DINOv2: a hidden-state index (null: -2, as LLaVA).
    vpg_layer: Optional[int] = None
    # Standardise the VPG features per channel (statistics of the training images, fitted when a
    # run starts without init_from, stored with the trained tensors). Not in the paper; needed for
    # uncentred features such as EfficientNet block outputs.
    feature_norm: bool = False
    # Normalise the images with this per-channel mean / std instead of the VPG checkpoint's own
    # (preprocessor_config.json). The reference PILL code uses ImageNet's (0.485, 0.456, 0.406) /
    # (0.229, 0.224, 0.225) in front of BLIP-2, whose checkpoints ship CLIP's.
    image_mean: Optional[list[float]] = None
    image_std: Optional[list[float]] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the frozen weights
    # Smoke tests: tiny random-init models (llm then names a family of pill.families: llama, qwen3, ...).
    random_init: bool = False
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)

    def _check_without_image(self) -> None:
        """``vpg: null``: the image encoder's own settings must be unset, and another encoder named."""
        set_fields = [name for name in ("vpg_path", "vpg_layer", "pool", "image_mean", "image_std")
                      if getattr(self, name) is not None] + (["feature_norm"] if self.feature_norm else [])
        if set_fields:
            raise ConfigError(f"{', '.join(set_fields)}: settings of the image encoder, and vpg is null "
                              "(no image encoder); remove them or name a vpg")
        if not self.encoders:
            raise ConfigError("vpg: null leaves the model without an encoder; name a vpg, or an encoder under "
                              "encoders (e.g. encoders: {audio: {name: whisper-base}})")
        self._check_encoders()

    def encoder_configs(self) -> dict[str, EncoderConfig]:
        """Modality name -> encoder: the image encoder, then ``encoders``."""
        if self.vpg is None:
            return dict(self.encoders)
        image = EncoderConfig(self.vpg, self.vpg_path, self.vpg_layer, self.pool, self.feature_norm,
                              image_mean=self.image_mean, image_std=self.image_std)
        return {"image": image, **self.encoders}

    def __post_init__(self):
        from .encoders import validate_encoder_settings

        if self.random_init:
            from .families import supported_types

            if self.llm not in supported_types():
                raise ConfigError(f"llm: with random_init it names a family ({', '.join(supported_types())}), "
                                  f"got {self.llm!r}")
        from .encoders import get_encoder

        if self.vpg is None:
            self._check_without_image()
            return
        validate_encoder_settings(self.vpg, self.vpg_path, self.vpg_layer, self.pool)
        _check_normalisation(self.image_mean, self.image_std)
        if get_encoder(self.vpg).modality != "image":
            raise ConfigError(f"vpg: {self.vpg!r} encodes {get_encoder(self.vpg).modality}, not images "
                              f"(put it under encoders.{get_encoder(self.vpg).modality})")
        self._check_encoders()

    def _check_encoders(self) -> None:
        from .encoders import get_encoder, validate_encoder_settings
        from .modalities import modality

        if "image" in self.encoders:
            raise ConfigError("encoders.image: the image encoder is set by vpg, vpg_path, vpg_layer and pool")
        for name, enc in self.encoders.items():
            try:
                modality(name)
                validate_encoder_settings(enc.name, enc.path, enc.layer, enc.pool, enc.max_seconds)
                if get_encoder(enc.name).modality != name:
                    raise ConfigError(f"name: encoder {enc.name!r} encodes {get_encoder(enc.name).modality}, "
                                      f"not {name}")
            except ConfigError as e:
                raise ConfigError(f"encoders.{name}: {e}") from None


@dataclass
class DataConfig:
    """Where the samples come from and how they become prompts."""

    format: Literal["scienceqa", "llava"] = "scienceqa"
    # How samples become text (pill.data.prompts). pill: the LLM's own chat template, the image
    # placeholder on its own line. reference: the reference PILL code's text -- "[INST]" + user +
    # "[/INST]" + answer per turn, and for ScienceQA its system message and "Image:" / "Image:N/A."
    prompt_style: Literal["pill", "reference"] = "pill"
    root: Optional[str] = None  # ScienceQA folder (official layout or parquet export)
    split: str = "train"
    prompt_format: str = "QCM-A"  # ScienceQA input-output format, e.g. QCM-ALE
    use_caption: bool = False
    # System message of every sample (training, and `pill eval` / `pill chat` with this run).
    # None: the chat template's default (SmolLM2's adds its own); "": an empty system message.
    system_prompt: Optional[str] = None
    json: Optional[str] = None  # LLaVA JSON file
    image_folder: Optional[str] = None  # LLaVA image folder
    max_length: int = 512
    wrong_answer_p: float = 0.0  # random-wrong-answer augmentation (paper: 0.1)
    skip_bad: bool = False  # skip (and count) malformed samples instead of stopping
    # Accept sample paths (a LLaVA image, a ScienceQA image name) that resolve outside the image
    # folder / ScienceQA root, through ../, an absolute path or a symlink; refused by default.
    allow_outside_root: bool = False
    too_long: Literal["skip", "error"] = "skip"
    limit: Optional[int] = None  # use only the first N samples
    # Also train on this LLaVA JSON (e.g. captions mixed into instruction tuning, as LLaVA-1.5 does).
    mix_llava_json: Optional[str] = None
    mix_image_folder: Optional[str] = None
    mix_limit: Optional[int] = None  # use only the first N samples of mix_llava_json

    def __post_init__(self):
        if self.format == "scienceqa" and not self.root:
            raise ConfigError("root: required for format scienceqa")
        if self.format == "llava" and not self.json:
            raise ConfigError("json: required for format llava")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be >= 1, got {self.limit}")
        if self.mix_limit is not None and self.mix_limit < 1:
            raise ConfigError(f"mix_limit: must be >= 1, got {self.mix_limit}")
        if not 0.0 <= self.wrong_answer_p <= 1.0:
            raise ConfigError(f"wrong_answer_p: must be in [0, 1], got {self.wrong_answer_p}")
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be >= 8, got {self.max_length}")
        if self.format == "scienceqa":
            from .data.prompts import parse_format

            try:
                parse_format(self.prompt_format)
            except Exception as e:
                raise ConfigError(f"prompt_format: {e}") from None


MAX_LR = 1.0


@dataclass
class OptimConfig:
    """AdamW with cosine decay after a linear warm-up.

    The learning rate is given either as ``lr`` (the rate itself) or as ``base_lr`` with
    ``lr_scaling: linear_256``, the rule of the reference code: ``lr = base_lr * batch_size / 256``
    (``batch_size`` being the global batch, accumulation included). :attr:`effective_lr` is the
    rate the optimizer uses either way; neither given means ``lr`` 2e-3.
    """

    lr: Optional[float] = None
    base_lr: Optional[float] = None
    lr_scaling: Optional[Literal["linear_256"]] = None  # how base_lr becomes the rate; required with base_lr
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.05
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    batch_size: int = 4  # global batch (samples per optimizer step), independent of the process count
    micro_batch_size: int = 4  # per process and forward pass; gradients accumulate up to batch_size
    grad_clip: Optional[float] = 1.0  # max gradient norm; null: no clipping
    min_lr_ratio: float = 0.0
    gate_lr_scale: float = 1.0  # learning-rate multiplier for the attention gates (MAG)
    # weight decay of the attention gates: 0 keeps an unused gate at zero; the reference code
    # decays every trained matrix, gates included
    gate_weight_decay: float = 0.0
    # learning-rate multiplier for the projector: Adam moves every weight by about lr per step, so
    # the projected image tokens move by about lr * |features|_1 -- large next to the LLM's
    # embeddings when the VPG's features are wide and unnormalised (EfficientNet: 1280 channels)
    projector_lr_scale: float = 1.0

    DEFAULT_LR = 2e-3

    @property
    def effective_lr(self) -> float:
        """The learning rate the optimizer uses (peak of the schedule)."""
        if self.base_lr is not None:
            return self.base_lr * self.batch_size / 256  # lr_scaling linear_256, the only rule
        return self.lr if self.lr is not None else self.DEFAULT_LR

    def __post_init__(self):
        if self.lr is not None and self.base_lr is not None:
            raise ConfigError(f"lr and base_lr: set one of them, not both (lr {self.lr}, base_lr {self.base_lr}; "
                              "base_lr with lr_scaling gives lr = base_lr * batch_size / 256)")
        if self.base_lr is not None and self.lr_scaling is None:
            raise ConfigError("lr_scaling: required with base_lr (linear_256: lr = base_lr * batch_size / 256)")
        if self.lr_scaling is not None and self.base_lr is None:
            raise ConfigError("lr_scaling: only with base_lr (set base_lr, or drop lr_scaling and set lr)")
        for name in ("lr", "base_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be > 0, got {value}")
        # Adam moves every weight by about lr per step: above 1 a single step outweighs the weights
        # themselves, and a huge lr (1e30) overflows them to inf/NaN.
        lr = self.effective_lr
        if not 0 < lr <= MAX_LR:
            what = "lr" if self.base_lr is None else "base_lr x batch_size / 256"
            raise ConfigError(f"{what}: must be in (0, {MAX_LR}], got {lr}")
        for name in ("gate_lr_scale", "projector_lr_scale"):
            scale = getattr(self, name)
            if scale <= 0:
                raise ConfigError(f"{name}: must be > 0, got {scale}")
            if lr * scale > MAX_LR:
                raise ConfigError(f"{name}: lr x {name} = {lr * scale:g} must be <= {MAX_LR}")
        if self.gate_weight_decay < 0:
            raise ConfigError(f"gate_weight_decay: must be >= 0, got {self.gate_weight_decay}")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("batch_size and micro_batch_size: must be >= 1")
        if self.epochs < 1:
            raise ConfigError(f"epochs: must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps: must be >= 1 (or null: the epochs decide), got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(f"grad_clip: must be >= 0 (0 or null: no clipping), got {self.grad_clip}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


# The experiment trackers of Hugging Face accelerate (accelerate.utils.LoggerType), by config name.
REPORT_TO = ("tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab")


@dataclass
class RunConfig:
    """Engine settings: precision, checkpoints, logging, caches."""

    seed: int = 0
    # auto: bf16 where the hardware has it natively (a bf16 GPU, a CPU with avx512_bf16/amx_bf16),
    # else float32; PILL_PRECISION=float32|bf16 decides auto from outside (pill.precision)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False  # recompute whole LLM layers in backward (least memory)
    # recompute norm + plug-ins in backward instead of keeping their activations: the plugged
    # model's activation memory stays within a few per cent of the frozen model's (BENCHMARKS.md)
    recompute_plugins: bool = True
    # torch.compile every decoder layer (PillVLM.compile_layers). On a 2-core CPU a 4 x 512 stage-2
    # step took 0.68x the eager time after a first step of 268 s (BENCHMARKS.md, "GPU readiness").
    # Off by default: short runs (the demo, tests) do not earn the compilation back, a new batch
    # shape recompiles once, and on GPU it is unmeasured
    compile: bool = False
    save_every: int = 100  # optimizer steps between resumable checkpoints
    keep_last: int = 2
    log_every: int = 1
    # Experiment trackers (accelerate's): loss, learning rate, tokens/s and gradient norm every
    # log_every steps, mean |tanh(gate)| per layer at every save. Names: REPORT_TO; "all": every
    # one installed. TensorBoard writes under <run>/logs.
    report_to: list[str] = field(default_factory=list)
    tensorboard: bool = False  # the same as report_to: [tensorboard] (older configs)
    feature_cache: bool = True  # compute frozen VPG features once, reuse them every epoch
    cache_dir: Optional[str] = None  # default: <pill cache>/features
    output_dir: Optional[str] = None

    def __post_init__(self):
        if self.save_every < 1 or self.keep_last < 1 or self.log_every < 1:
            raise ConfigError("save_every, keep_last and log_every: must be >= 1")
        for name in self.report_to:
            if name not in REPORT_TO and name != "all":
                raise ConfigError(f"report_to: unknown tracker {name!r}; choose from {', '.join(REPORT_TO)} or all")
        if self.tensorboard and "tensorboard" not in self.report_to:
            self.report_to.append("tensorboard")
        self.report_to = list(dict.fromkeys(self.report_to))
        if not 0 <= self.seed < 2**32:  # numpy's seed range
            raise ConfigError(f"seed: must be in [0, 2**32), got {self.seed}")


@dataclass
class TrainConfig:
    """One training stage. ``init_from``: a finished run whose plug-ins this stage starts from."""

    stage: Literal["align", "finetune"] = "finetune"
    init_from: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    pill: PillConfig = field(default_factory=PillConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(root="."))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "TrainConfig":
        return from_dict(cls, data, where)


# -- what a resumed run may change -------------------------------------------------------------
# ``--resume`` continues a run with the config given now. These keys steer the engine (how long,
# how often to save and log, how memory is spent) and may change mid-run; the change is logged.
# Every other key (the models, the plug-ins, the data, the learning rate and its schedule shape,
# the batch, the seed, the precision, init_from, stage) shapes what is learnt: changing one is an
# error that lists each changed key, old -> new.
RESUME_SAFE_KEYS: dict[str, str] = {
    "optim.max_steps": "the run's length (the cosine schedule is laid out for the new total)",
    "optim.epochs": "the run's length (the cosine schedule is laid out for the new total)",
    "optim.micro_batch_size": "how a global batch is split into forward passes (the same gradient)",
    "train.save_every": "how often checkpoints are written",
    "train.keep_last": "how many checkpoints are kept",
    "train.log_every": "how often metrics are logged",
    "train.tensorboard": "logging",
    "train.feature_cache": "whether encoder features are cached (the same features)",
    "train.cache_dir": "where encoder features are cached",
    "train.output_dir": "the run directory",
    "train.gradient_checkpointing": "memory: recompute layers in the backward pass",
    "train.recompute_plugins": "memory: recompute the plug-ins in the backward pass",
}


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


UNSET = "(unset)"


def config_changes(old: dict, new: dict) -> tuple[list[tuple[str, object, object]], list[tuple[str, object, object]]]:
    """Compare two plain-data configs (:meth:`TrainConfig.to_dict`) key by key; returns
    ``(breaking, safe)`` lists of ``(dotted key, old value, new value)``, safe ones being those of
    :data:`RESUME_SAFE_KEYS`. Fields that ``old`` predates count with their defaults; when ``old``
    does not load as a config of this version, only the keys both have are compared."""
    a, b = _flatten(old), _flatten(new)
    try:
        a = _flatten(TrainConfig.from_dict(old).to_dict())
        keys = set(a) | set(b)
    except ConfigError:
        keys = set(a) & set(b)
    breaking, safe = [], []
    for key in sorted(keys):
        va, vb = a.get(key, UNSET), b.get(key, UNSET)
        if va != vb:
            (safe if key in RESUME_SAFE_KEYS else breaking).append((key, va, vb))
    return breaking, safe


# A stage starts from the tensors of its ``init_from`` run: these keys shape those tensors or what
# they mean, and must be the same in both stages (the base models are checked by fingerprint).
STAGE_KEYS = ("model.vpg", "model.vpg_layer", "model.feature_norm", "pill.adapter", "pill.r", "pill.activation",
              "pill.attn_adapter", "pill.momae", "pill.num_modalities", "pill.mag", "pill.gate", "pill.layers")
_STAGE_ENCODER_FIELDS = ("name", "layer", "feature_norm")


def stage_mismatches(earlier: dict, later: dict) -> list[tuple[str, object, object]]:
    """``(key, earlier value, later value)`` for each :data:`STAGE_KEYS` key (and each encoder's
    ``name``, ``layer``, ``feature_norm``) on which a stage and its ``init_from`` run differ."""
    breaking, safe = config_changes(earlier, later)
    return [(k, a, b) for k, a, b in breaking + safe
            if k in STAGE_KEYS or (k.startswith("model.encoders.") and k.rsplit(".", 1)[1] in _STAGE_ENCODER_FIELDS)]


def format_changes(changes: list[tuple[str, object, object]]) -> str:
    """``key old -> new; ...`` for messages."""
    def show(v):
        return v if v is UNSET else repr(v)

    return "; ".join(f"{k} {show(old)} -> {show(new)}" for k, old, new in changes)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides to a nested dict. Values keep their text
    (:func:`pill.config.parse_override`) until validation reads them as the type of their
    field: ``train.mixed_precision=no`` is the string ``no``, ``optim.lr=1e-3`` a number."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=1e-3")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        try:
            node[parts[-1]] = parse_override(value)
        except ConfigError as e:
            raise ConfigError(f"--set {key}: {e}") from None
    return data


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read a YAML training config, apply ``--set`` overrides, validate. Relative data paths
    are resolved against the config file's folder when they exist there."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    try:
        return TrainConfig.from_dict(data, where=path.name)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML, atomically (:func:`pill.io.write_atomic`)."""
    from .io import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_needs(path: str | Path) -> Optional[str]:
    """What a config file says it needs: its ``# Needs: ...`` comment line, or None."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if not line.startswith("#"):
            break
        if line.lower().startswith("# needs:"):
            return line.split(":", 1)[1].strip()
    return None


def missing_inputs(cfg: TrainConfig) -> list[tuple[str, str]]:
    """``(field, path)`` of every data path and ``init_from`` run of ``cfg`` that does not exist."""
    d = cfg.data
    paths = [("data.root", d.root)] if d.format == "scienceqa" else [("data.json", d.json),
                                                                    ("data.image_folder", d.image_folder)]
    paths += [("data.mix_llava_json", d.mix_llava_json), ("data.mix_image_folder", d.mix_image_folder),
              ("init_from", cfg.init_from)]
    return [(k, v) for k, v in paths if v and not Path(v).exists()]


def check_inputs(cfg: TrainConfig, source: str | Path | None = None) -> None:
    """Raise ConfigError, before any model is loaded, when a data path or ``init_from`` is missing.
    ``source``: the config file, whose ``# Needs:`` line is quoted in the message."""
    missing = missing_inputs(cfg)
    if not missing:
        return
    where = f"{source}: " if source else ""
    listed = "; ".join(f"{k} {v} does not exist" for k, v in missing)
    needs = config_needs(source) if source else None
    hint = f". This config needs: {needs}" if needs else ""
    raise ConfigError(f"{where}{listed}{hint}")

