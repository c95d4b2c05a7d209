"""Sub-command ``pill serve``: the web demo (see :mod:`pill.web`)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from ..cli import port, positive_int
from ..errors import CheckpointError, PillError

UNTRAINED_NOTE = "embedded default, untrained plug-ins"


def load_demo_model(run: Optional[str] = None, device: str = "cpu"):
    """The model the demo serves and its side-panel info: a trained run, or the embedded default.

    ``run``: a run directory (``config.yaml``, ``pill.safetensors``, ...) loaded with
    ``pill.build.load_run``; None loads SmolLM2-135M-Instruct + EfficientNet-Lite0 with
    freshly initialised (untrained) plug-ins. Returns ``(vlm, info)``.
    """
    from .app import model_info

    from ..build import load_model

    if run is None:
        vlm = load_model(None, device=device, quiet=True)
        return vlm, model_info(vlm, llm=f"SmolLM2-135M-Instruct ({UNTRAINED_NOTE})",
                               vpg="EfficientNet-Lite0 (ImageNet weights)")
    check_run_dir(run)
    vlm = load_model(run, device=device)
    return vlm, model_info(vlm, run_dir=run)


def check_run_dir(run: str) -> None:
    """Raise PillError unless ``run`` is a folder with a ``config.yaml`` (cheap: nothing is loaded)."""
    if not Path(run).is_dir():
        raise PillError(f"--run {run}: no such run directory")
    if not (Path(run) / "config.yaml").is_file():
        raise CheckpointError(f"--run {run}: not a pill run directory (no config.yaml)")


def _serve(args: argparse.Namespace) -> int:
    from .app import Limits
    from .server import serve

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                    max_input_bytes={name: int(mb * 2**20) for name, mb in args.max_input_mb})
    if args.run:
        check_run_dir(args.run)  # before the "loading" line, so that a bad --run is the only line printed
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"loading {'run ' + args.run if args.run else 'the embedded default model (untrained plug-ins)'} ...",
          file=sys.stderr)
    vlm, info = load_demo_model(args.run, args.device)

    def ready(server) -> None:
        print(f"pill demo: open {server.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)

    try:
        serve(vlm, args.host, args.port, info=info, limits=limits, ready=ready, api_key=args.api_key)
    except OSError as e:
        raise PillError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0


def _positive_mb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1024:
        raise argparse.ArgumentTypeError(f"must be in (0, 1024] MB, got {text}")
    return value


def _modality_mb(text: str) -> tuple[str, float]:
    name, sep, mb = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected MODALITY=MB, e.g. audio=20, got {text!r}")
    return name.strip(), _positive_mb(mb)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pill serve`` to the ``pill`` parser."""
    p = sub.add_parser("serve", help="web demo: ask the model about an image in the browser",
                       description="Start a local web page to ask a PILL model about an image. Without "
                                   "--run it serves the embedded default model with untrained plug-ins.")
    p.add_argument("--run", metavar="DIR", help="trained run directory (default: embedded model, untrained plug-ins)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=port, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--max-upload-mb", type=_positive_mb, default=10.0, metavar="N",
                   help="largest upload in MB, of any modality (default 10)")
    p.add_argument("--max-input-mb", type=_modality_mb, action="append", default=[], metavar="MODALITY=MB",
                   help="largest upload of one modality in MB, e.g. audio=20 (repeatable)")
    p.add_argument("--max-pixels", type=positive_int, default=4096 * 4096, metavar="N",
                   help="largest image in pixels, width x height (default 16777216 = 4096 x 4096)")
    p.add_argument("--device", default="cpu", help="torch device of the model (default cpu)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help="require 'Authorization: Bearer KEY' on the OpenAI-compatible /v1/ API (default: none)")
    p.set_defaults(func=_serve)
