"""``pill train`` and ``pill features``."""
from __future__ import annotations

import argparse
import os

from ..cli import positive_int


def _train(args) -> int:
    from ..runconfig import check_inputs, load_config
    from .loop import train

    cfg = load_config(args.config, args.set)
    check_inputs(cfg, args.config)
    summary = train(cfg, args.output, resume=args.resume, max_steps=args.max_steps)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
          f"{summary['trainable']:,} trainable parameters -> {summary['run_dir']}")
    return 0


def _features(args) -> int:
    from ..runconfig import check_inputs, load_config
    from ..build import build_vlm, load_dataset_samples
    from .loop import prepare_features

    cfg = load_config(args.config, args.set)
    check_inputs(cfg, args.config)
    vlm = build_vlm(cfg)
    caches, keys = prepare_features(cfg, vlm, load_dataset_samples(cfg))
    for name, cache in caches.items():
        print(f"{name}: {len(keys[name])} inputs, {len(cache)} cached feature entries in {cache.dir}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one stage (align or finetune) from a YAML config")
    p.add_argument("config", help="YAML training config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--output", help="run directory (default: train.output_dir of the config)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run directory")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    p.set_defaults(func=_train)

    p = sub.add_parser("features", help="compute and cache the frozen VPG features of a config's images")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_features)
