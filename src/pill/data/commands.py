"""``pill data ...``: inspect datasets as the model will see them; build the synthetic benchmarks."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..cli import non_negative_int, positive_int
from ..errors import ConfigError, DataError


def register(subparsers) -> None:
    """Add ``data inspect scienceqa|llava``, ``data synth`` and ``data synth-audio`` to the ``pill`` parser."""
    data = subparsers.add_parser("data", help="inspect datasets; build the synthetic benchmark")
    data.set_defaults(func=lambda args: _help(data))
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")

    inspect = actions.add_parser("inspect", help="print built prompts and targets, and counts")
    inspect.set_defaults(func=lambda args: _help(inspect))
    kinds = inspect.add_subparsers(dest="dataset", metavar="DATASET")

    sqa = kinds.add_parser("scienceqa", help="ScienceQA folder or parquet export")
    sqa.add_argument("--root", required=True, help="folder with problems.json, or parquet file(s)")
    sqa.add_argument("--split", default="test")
    sqa.add_argument("--format", default="QCM-A", help="<input>-<output> prompt format, e.g. QCM-ALE")
    sqa.add_argument("--limit", type=positive_int, default=3, help="how many samples to print")
    sqa.add_argument("--caption", action="store_true", help="add captions.json to the context")
    sqa.add_argument("--skip-bad", action="store_true", help="skip malformed problems, counting them")
    sqa.add_argument("--allow-outside-root", action="store_true",
                     help="accept image paths that resolve outside --root (../, absolute, symlinks)")
    _chat_args(sqa)
    sqa.set_defaults(func=_inspect_scienceqa)

    llava = kinds.add_parser("llava", help="LLaVA JSON (CC595K chat.json, LLaVA-1.5 665k)")
    llava.add_argument("--json", required=True, help="the LLaVA JSON or JSONL file")
    llava.add_argument("--image-folder", required=True, help="folder the records' image paths are relative to")
    llava.add_argument("--limit", type=positive_int, default=3)
    llava.add_argument("--skip-bad", action="store_true")
    llava.add_argument("--allow-outside-root", action="store_true",
                       help="accept image paths that resolve outside --image-folder (../, absolute, symlinks)")
    _chat_args(llava)
    llava.set_defaults(func=_inspect_llava)

    synth = actions.add_parser("synth", help="render the built-in shapes benchmark (ScienceQA layout)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--n-train", type=non_negative_int, default=2000)
    synth.add_argument("--n-test", type=non_negative_int, default=200)
    synth.add_argument("--n-val", type=non_negative_int, default=None, help="default: --n-test")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synth)

    audio = actions.add_parser("synth-audio", help="synthesise the built-in audio benchmark (ScienceQA layout; "
                                                   "needs espeak-ng)")
    audio.add_argument("--out", required=True, help="output folder")
    audio.add_argument("--n-train", type=non_negative_int, default=2000)
    audio.add_argument("--n-test", type=non_negative_int, default=200)
    audio.add_argument("--n-val", type=non_negative_int, default=None, help="default: --n-test")
    audio.add_argument("--seed", type=int, default=0)
    audio.set_defaults(func=_synth_audio)


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="also render with this LLM's chat template and count tokens (e.g. smollm2-135m-instruct)")
    p.add_argument("--template", default=None,
                   help="chat template name (llama-2, chatml, plain, reference) or Jinja text")
    p.add_argument("--prompt-style", choices=["pill", "reference"], default="pill",
                   help="pill: the LLM's chat template; reference: the reference PILL code's prompts "
                        "(data.prompt_style)")


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _show(samples, args) -> None:
    from .prompts import OPTION_LETTERS

    tokenizer = None
    if args.model:
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    for s in samples[: args.limit]:
        extra = f", answer {OPTION_LETTERS[s.meta['answer']]}" if "answer" in s.meta else ""
        images = ", ".join(f"<{len(i)} bytes>" if isinstance(i, bytes) else i for i in s.images) or "none"
        more = "".join(f"; {name}: {', '.join(map(str, refs))}" for name, refs in s.media.items() if refs)
        print(f"--- {s.id}{extra}; images: {images}{more}")
        for m in s.messages:
            print(f"[{m['role']}]\n{m['content']}")
        if tokenizer is not None:
            from .prompts import render_chat

            text = render_chat(tokenizer, s.messages, args.template or s.meta.get("template"))
            n = len(tokenizer(text.replace("<image>", ""), add_special_tokens=False)["input_ids"])
            print(f"[rendered with {args.model}: {n} text tokens + the image tokens]\n{text}")


def _inspect_scienceqa(args) -> int:
    from .prompts import parse_format
    from .scienceqa import load_scienceqa, scienceqa_stats

    try:
        parse_format(args.format)
    except ConfigError as e:
        raise ConfigError(f"--format: {e}") from None
    stats = scienceqa_stats(args.root, args.split, allow_outside_root=args.allow_outside_root)
    print(f"ScienceQA {args.root} [{args.split}]")
    for key, value in stats.items():
        print(f"  {key}: {value}")
    samples = load_scienceqa(args.root, args.split, prompt_format=args.format, use_caption=args.caption,
                             skip_bad=args.skip_bad, limit=args.limit if not args.skip_bad else None,
                             allow_outside_root=args.allow_outside_root, prompt_style=args.prompt_style)
    if args.skip_bad:
        print(samples.report.summary())
    print(f"format {args.format}; the first {min(args.limit, len(samples))} samples:")
    _show(samples, args)
    return 0


def _inspect_llava(args) -> int:
    from .llava import load_llava

    samples = load_llava(args.json, args.image_folder, skip_bad=args.skip_bad,
                         allow_outside_root=args.allow_outside_root, prompt_style=args.prompt_style)
    print(samples.report.summary())
    _show(samples, args)
    return 0


def _synth(args) -> int:
    from .synth import make_synth

    try:  # an unusable --out fails here, before any image is rendered
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {args.out}: cannot create the folder ({e.strerror or e})") from None
    start = time.time()
    info = make_synth(args.out, args.n_train, args.n_test, args.seed, n_val=args.n_val)
    print(json.dumps(info, indent=2))
    print(f"wrote {sum(info['splits'].values())} problems to {args.out} in {time.time() - start:.1f} s")
    return 0


def _synth_audio(args) -> int:
    from .synth_audio import espeak_binary, make_synth_audio

    espeak_binary()  # a missing espeak-ng fails here, before anything is written
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {args.out}: cannot create the folder ({e.strerror or e})") from None
    start = time.time()
    info = make_synth_audio(args.out, args.n_train, args.n_test, args.seed, n_val=args.n_val)
    print(json.dumps(info, indent=2))
    print(f"wrote {sum(info['splits'].values())} problems to {args.out} in {time.time() - start:.1f} s")
    return 0
