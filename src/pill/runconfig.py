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


@dataclass
class ModelConfig:
    """Which frozen models to plug together. ``vpg*``, ``pool`` and ``feature_norm`` set the image
    encoder; ``encoders`` adds the encoders of further modalities, by modality name."""

    llm: str = "smollm2-135m-instruct"  # embedded default, HF folder or hub id
    vpg: str = "efficientnet-lite0"  # a registered encoder (pill.encoders.encoder_names())
    vpg_path: Optional[str] = None  # checkpoint folder or hub id, for the encoders that need one (BLIP-2, CLIP, DINOv2)
    pool: Optional[int] = None  # EfficientNet only: pool the feature grid to pool x pool tokens
    # Which VPG layer gives the tokens. EfficientNet: a block index 0-15 (null: the head, 7x7x1280;
    # 10: 14x14x112); CLIP, DINOv2: a hidden-state index (null: -2, as LLaVA).
    vpg_layer: Optional[int] = None
    # Standardise the VPG features per channel (statistics of the training images, fitted when a
    # run starts without init_from, stored with the trained tensors). Not in the paper; needed for
    # uncentred features such as EfficientNet block outputs.
    feature_norm: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of the frozen weights
    # Smoke tests: tiny random-init models (llm then names a family of pill.families: llama, qwen3, ...).
    random_init: bool = False
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)

    def encoder_configs(self) -> dict[str, EncoderConfig]:
        """Modality name -> encoder: the image encoder, then ``encoders``."""
        image = EncoderConfig(self.vpg, self.vpg_path, self.vpg_layer, self.pool, self.feature_norm)
        return {"image": image, **self.encoders}

    def __post_init__(self):
        from .encoders import validate_encoder_settings

        if self.random_init:
            from .families import supported_types

            if self.llm not in supported_types():
                raise ConfigError(f"llm: with random_init it names a family ({', '.join(supported_types())}), "
                                  f"got {self.llm!r}")
        from .encoders import get_encoder

        validate_encoder_settings(self.vpg, self.vpg_path, self.vpg_layer, self.pool)
        if get_encoder(self.vpg).modality != "image":
            raise ConfigError(f"vpg: {self.vpg!r} encodes {get_encoder(self.vpg).modality}, not images "
                              f"(put it under encoders.{get_encoder(self.vpg).modality})")
        if "image" in self.encoders:
            raise ConfigError("encoders.image: the image encoder is set by vpg, vpg_path, vpg_layer and pool")
        from .modalities import modality

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


@dataclass
class OptimConfig:
    """AdamW with cosine decay after a linear warm-up."""

    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.05
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    batch_size: int = 4  # global batch (samples per optimizer step), independent of the process count
    micro_batch_size: int = 4  # per process and forward pass; gradients accumulate up to batch_size
    grad_clip: Optional[float] = 1.0
    min_lr_ratio: float = 0.0
    gate_lr_scale: float = 1.0  # learning-rate multiplier for the attention gates (MAG)
    # learning-rate multiplier for the projector: Adam moves every weight by about lr per step, so
    # the projected image tokens move by about lr * |features|_1 -- large next to the LLM's
    # embeddings when the VPG's features are wide and unnormalised (EfficientNet: 1280 channels)
    projector_lr_scale: float = 1.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.gate_lr_scale <= 0 or self.projector_lr_scale <= 0:
            raise ConfigError("gate_lr_scale and projector_lr_scale: must be > 0")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("batch_size and micro_batch_size: must be >= 1")
        if self.epochs < 1:
            raise ConfigError(f"epochs: must be >= 1, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas: must be two numbers, got {self.betas}")


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
    save_every: int = 100  # optimizer steps between resumable checkpoints
    keep_last: int = 2
    log_every: int = 1
    tensorboard: bool = False
    feature_cache: bool = True  # compute frozen VPG features once, reuse them every epoch
    cache_dir: Optional[str] = None  # default: <pill cache>/features
    output_dir: Optional[str] = None

    def __post_init__(self):
        if self.save_every < 1 or self.keep_last < 1 or self.log_every < 1:
            raise ConfigError("save_every, keep_last and log_every: must be >= 1")


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
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
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
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


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

