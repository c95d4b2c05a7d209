"""Core sub-commands: ``pill params``, ``pill demo``, ``pill card`` / ``pill push`` (the Hub) and
``pill convert reference``."""
from __future__ import annotations

import argparse
from typing import Optional

from .config import PillConfig
from .cli import positive_int
from .errors import ConfigError, PillError


def count_parameters(llm: str = "llama2-7b", vpg: str = "blip2-qformer", stage: str = "finetune",
                     config: Optional[PillConfig] = None, vpg_layer: Optional[int] = None,
                     audio: Optional[str] = None) -> dict:
    """Trainable-parameter table of a PILL model built on the meta device (no weights, no download).

    ``llm``: a preset (``llama2-7b``, ``smollm2-135m``), ``smollm2-135m-instruct`` or any Hugging Face
    folder / hub id (only its config is read). ``vpg``: a registered encoder with a meta-device preset
    (:func:`~pill.encoders.meta_encoder`: ``blip2-qformer``, ``efficientnet-lite0``, ``clip``, ``dinov2``);
    ``vpg_layer``: its layer whose output the projector reads (EfficientNet: a block; default the head).
    ``audio``: an audio encoder (``whisper-base``) to add: its projector, expert and frozen encoder
    get their own rows.
    Returns ``{"llm", "vpg", "stage", "rows": [...], "trainable": int}`` (and ``"audio"`` when given).
    """
    import torch

    from .encoders import meta_encoder
    from .models import LLM_PRESETS, build_llm_from_config, build_llm_preset
    from .vlm import PillVLM

    if llm in LLM_PRESETS:
        model = build_llm_preset(llm)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        if llm == "smollm2-135m-instruct":
            model = build_llm_preset("smollm2-135m")
        else:
            cfg = AutoConfig.from_pretrained(llm)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg)
    v = meta_encoder(vpg, layer=vpg_layer)
    more = {"audio": meta_encoder(audio)} if audio else {}
    with torch.device("meta"):
        vlm = PillVLM(model, v, None, config or PillConfig(), encoders=more)
    vlm.set_stage(stage)
    rows = vlm.parameter_table()
    return {"llm": llm, "vpg": vpg, **({"audio": audio} if audio else {}), "stage": stage, "rows": rows,
            "trainable": rows[-1]["trainable"]}


def format_parameter_table(result: dict) -> str:
    encoders = " + ".join(result[k] for k in ("vpg", "audio") if result.get(k))
    lines = [f"{result['llm']} + {encoders}, stage {result['stage']}", "",
             f"| {'part':<32} | {'parameters':>15} | {'trainable':>13} |", f"|{'-' * 34}|{'-' * 16}:|{'-' * 14}:|"]
    for r in result["rows"]:
        lines.append(f"| {r['part']:<32} | {r['parameters']:>15,} | {r['trainable']:>13,} |")
    return "\n".join(lines)


def _params(args) -> int:
    from .cli import print_json

    from .config import _coerce
    from .encoders import get_encoder

    raw = _load_yaml(args.config) if args.config else {}
    cfg = PillConfig.from_dict(raw.get("pill", {}))
    layer = _coerce((raw.get("model") or {}).get("vpg_layer"), Optional[int], "model.vpg_layer") \
        if get_encoder(args.vpg).accepts_layer else None
    result = count_parameters(args.llm, args.vpg, args.stage, cfg, vpg_layer=layer, audio=args.audio)
    if args.json:
        print_json(result)
    else:
        print(format_parameter_table(result))
    return 0


def _load_yaml(path: str) -> dict:
    from .config import load_yaml

    import yaml

    try:
        with open(path) as f:
            return load_yaml(f.read()) or {}
    except OSError as e:
        raise PillError(f"{path}: cannot read config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None


def _demo(args) -> int:
    from .demo import DemoSettings, run_demo

    out = args.out or {"audio": "runs/demo-audio", "image+audio": "runs/demo-image-audio"}.get(args.modality,
                                                                                                "runs/demo")
    st = DemoSettings(out=out, seed=args.seed, modality=args.modality)
    if args.modality != "image":
        st.max_new_tokens = 64  # the clip's description, the fact and the letter
    if args.modality == "image+audio":  # each benchmark gets the steps of its own demo
        st.align_steps, st.finetune_steps = 2 * st.align_steps, 2 * st.finetune_steps
    if args.quick:  # a shortened run that checks every step of the pipeline in about a minute
        st.n_train, st.n_test, st.align_steps, st.finetune_steps, st.quick = 48, 16, 2, 3, True
    if args.pool is not None and args.modality == "audio":
        raise ConfigError("pill demo --pool: sets the image tokens, and --modality audio reads no images; "
                          "--audio-pool N pools Whisper's 50 frames per second by N")
    if args.audio_pool is not None and args.modality == "image":
        raise ConfigError("pill demo --audio-pool: for --modality audio or image+audio (the image demo reads no audio)")
    for name in ("n_train", "n_test", "align_steps", "finetune_steps", "batch_size", "eval_mode", "precision",
                 "pool", "audio_pool"):
        if getattr(args, name) is not None:
            setattr(st, name, getattr(args, name))
    st.overrides = tuple(args.set or ())
    run_demo(st)
    return 0


def _demo_pool(text: str) -> int:
    """--pool of the demo: 1 .. the grid of the demo encoder's block 10 (14)."""
    from .encoders.efficientnet_blocks import feature_grid

    grid = feature_grid(10)
    value = positive_int(text)
    if value > grid:
        raise argparse.ArgumentTypeError(f"must be between 1 and the block-10 grid ({grid}), got {value}")
    return value


def _card(args) -> int:
    from .hub import write_model_card

    print(f"wrote {write_model_card(args.run, repo_id=args.repo)}")
    return 0


def _push(args) -> int:
    from .hub import export_run, push_run

    if args.to_folder:
        print(f"wrote {export_run(args.run, args.to_folder, repo_id=args.repo)}")
        return 0
    print(f"uploaded {args.run} -> {push_run(args.run, args.repo, private=args.private, message=args.message)}")
    return 0


def _repo_id(text: str) -> str:
    parts = text.split("/")
    if len(parts) != 2 or not all(parts) or text.startswith((".", "~")):
        raise argparse.ArgumentTypeError(f"must be a Hub repository id user/name, got {text!r}")
    return text


def _convert_reference(args) -> int:
    from .convert import convert_reference, default_config_path, load_convert_config

    config = args.config or default_config_path()
    cfg = load_convert_config(config, args.set)
    result = convert_reference(args.checkpoint, args.out, cfg, stage=args.stage, device=args.device or "cpu")
    epoch = f", epoch {result['epoch']}" if result["epoch"] is not None else ""
    print(f"wrote {result['run_dir']}: {result['tensors']} plug-in tensors, stage {result['stage']}{epoch}, "
          f"model from {config}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="write a finished run's model card (RUN/README.md, Hub format)")
    p.add_argument("run", metavar="RUN", help="a finished run directory")
    p.add_argument("--repo", type=_repo_id, metavar="ID", help="the Hub id the card names for loading (user/name)")
    p.set_defaults(func=_card)

    p = sub.add_parser("push", help="upload a finished run to a Hugging Face Hub model repository",
                       description="Write the model card, then upload the run (config, trained tensors, card, "
                                   "metrics, gates, scores; no resume states or logs) with huggingface_hub. "
                                   "Log in first (huggingface-cli login, or HF_TOKEN).")
    p.add_argument("run", metavar="RUN", help="a finished run directory")
    p.add_argument("--repo", required=True, type=_repo_id, metavar="ID", help="Hub repository id, user/name")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--message", help="commit message")
    p.add_argument("--to-folder", metavar="DIR", help="lay the repository out in DIR instead of uploading")
    p.set_defaults(func=_push)

    conv = sub.add_parser("convert", help="turn checkpoints of other code into pill runs")
    conv_sub = conv.add_subparsers(dest="source", metavar="SOURCE", required=True)
    p = conv_sub.add_parser("reference", help="a checkpoint of the reference PILL code (DsaltYfish/PILL) -> a run",
                            description="Rename the adapter, expert, gate and projector tensors of a .pth file "
                                        "written by the reference code onto pill's plug-ins in the model of "
                                        "CONFIG, and write RUN_DIR (config.yaml + pill.safetensors with that "
                                        "model's fingerprints). Anything that does not fit is refused.")
    p.add_argument("checkpoint", metavar="CKPT.pth", help="the reference checkpoint (read with weights_only=True)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to write")
    p.add_argument("--config", metavar="YAML",
                   help="training config whose model and pill sections the checkpoint belongs to "
                        "(default: the packaged configs/paper/stage2_scienceqa.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--stage", choices=["finetune", "align"], default="finetune",
                   help="finetune (ScienceQA / instruction tuning, default) or align (a CC595K checkpoint)")
    p.add_argument("--device", help="where to build the model for its fingerprints (default: cpu)")
    p.set_defaults(func=_convert_reference)

    p = sub.add_parser("demo", help="the whole method on CPU: benchmark, before/after, two training stages")
    p.add_argument("--out", default=None, help="run directory (default: runs/demo, with --modality audio "
                                               "runs/demo-audio, image+audio runs/demo-image-audio)")
    p.add_argument("--modality", choices=["image", "audio", "image+audio"], default="image",
                   help="image: the shapes benchmark (default); audio: the audio benchmark, Whisper-base encoder; "
                        "image+audio: one model trained on both (twice the steps), each benchmark reported")
    p.add_argument("--quick", action="store_true", help="a few steps on a tiny benchmark (checks the pipeline)")
    p.add_argument("--n-train", type=positive_int)
    p.add_argument("--n-test", type=positive_int)
    p.add_argument("--align-steps", type=positive_int)
    p.add_argument("--finetune-steps", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--eval-mode", choices=["likelihood", "generate"])
    p.add_argument("--precision", choices=["auto", "bf16", "float32", "no"],
                   help="training precision (default auto: bf16 where the CPU has it natively, else float32; "
                        "PILL_PRECISION=float32|bf16 decides auto)")
    p.add_argument("--pool", type=_demo_pool, help="pool the EfficientNet block-10 grid (14 x 14) to N x N visual "
                                                     "tokens (default 4)")
    p.add_argument("--audio-pool", type=positive_int, metavar="N",
                   help="audio: pool Whisper's 50 frames per second by N (default 4: 12.5 tokens per second)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value of both stages (e.g. optim.lr=3e-3), or of one stage with "
                        "align:KEY=VALUE / finetune:KEY=VALUE; repeatable")
    p.set_defaults(func=_demo)

    from .encoders import encoder_names

    p = sub.add_parser("params", help="trainable-parameter table (built on the meta device, no download)")
    p.add_argument("--llm", default="llama2-7b", help="preset (llama2-7b, smollm2-135m), HF folder or hub id")
    p.add_argument("--vpg", default="blip2-qformer",
                   choices=encoder_names("image"),
                   help="image encoder (its meta-device preset shapes; default blip2-qformer)")
    p.add_argument("--audio", default=None, choices=encoder_names("audio"),
                   help="also an audio encoder (whisper-base: 10 s windows, pool 4); its parts get their own rows")
    p.add_argument("--stage", default="finetune", choices=["align", "finetune"])
    p.add_argument("--config", help="YAML file whose 'pill:' section sets the plug-in config (and 'model: vpg_layer' "
                                    "the encoder layer, e.g. the EfficientNet block)")
    p.add_argument("--json", action="store_true", help="print JSON (field 'trainable' is the total)")
    p.set_defaults(func=_params)
