"""Talking to a model and measuring it: ``pill chat``, ``pill eval scienceqa`` and ``pill eval mme``.

The conversation itself is :class:`pill.chat.ChatSession` (the one chat path of the library, the
CLI and the web demo); :func:`interactive_chat` is the terminal's read-answer loop around it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence, TextIO

from ..build import UNTRAINED_NOTE  # noqa: F401  (printed by load_model)
from ..chat import ChatSession, chat_session  # noqa: F401  (the chat path, re-exported for `pill chat` users)

INTERACTIVE_HELP = ("type a message and press Enter; '/image PATH' attaches an image to your next message, "
                    "'/audio PATH' an audio clip, '/clear' starts a new conversation, 'exit' or Ctrl-D quits")


# -- chat on a terminal ------------------------------------------------------------------------

def interactive_chat(session: ChatSession, lines: Iterable[str], out: TextIO = sys.stdout,
                     err: TextIO = sys.stderr, images: Sequence = (),
                     inputs: Optional[dict[str, Sequence]] = None) -> int:
    """Read messages from ``lines`` and stream each answer to ``out`` until EOF or ``exit``.

    Commands: ``/image PATH`` attaches an image to the next message (``/audio PATH`` an audio clip,
    ``/<modality> PATH`` an input of any modality the model reads), ``/clear`` starts a new
    conversation, ``/help``, ``exit`` / ``quit``. ``images`` and ``inputs`` (other modalities by
    name) are attached to the first message. Prompts, notes and errors (a bad image path, ...) go
    to ``err``; only answers go to ``out``. Returns the number of answered turns.
    """
    from ..errors import PillError
    from ..modalities import modality

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    pending = {**{k: list(v) for k, v in (inputs or {}).items()}, **({"image": list(images)} if images else {})}
    commands = {f"/{name}": name for name in session.vlm.modalities}
    turns = 0
    print(f"pill chat: {INTERACTIVE_HELP}", file=err)
    it = iter(lines)
    while True:
        err.write("> ")
        err.flush()
        line = next(it, None)
        if line is None:
            err.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("exit", "quit", "/exit", "/quit"):
            break
        if text == "/help":
            print(INTERACTIVE_HELP, file=err)
            continue
        if text == "/clear":
            session.clear()
            pending = {}
            print("(conversation cleared)", file=err)
            continue
        word = text.split()[0]
        if word in commands or word in ("/image", "/audio"):
            path = text[len(word):].strip().strip("'\"")
            if word not in commands:
                print(f"error: this model reads no {word[1:]} inputs (its encoders: "
                      f"{', '.join(session.vlm.modalities)})", file=err)
                continue
            if not path:
                print(f"usage: {word} PATH", file=err)
                continue
            m = modality(commands[word])
            try:
                pending.setdefault(m.name, []).append(m.load(path))
            except PillError as e:
                print(f"error: {e}", file=err)
                continue
            print(f"({m.label} attached to your next message: {path})", file=err)
            continue
        try:
            session.ask(text, pending.get("image", []), stream=write,
                        inputs={k: v for k, v in pending.items() if k != "image"})
        except PillError as e:
            print(f"error: {e}", file=err)
            continue
        out.write("\n")
        out.flush()
        pending = {}
        turns += 1
    return turns


# -- command handlers -------------------------------------------------------------------------

def _device(name: Optional[str]) -> str:
    if name:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _stdin_lines() -> Iterable[str]:
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input()
        except EOFError:
            return


def _chat(args: argparse.Namespace) -> int:
    from ..build import load_model
    from ..data.audio import load_audio
    from ..data.images import load_image
    from ..errors import PillError

    images = [load_image(p) for p in args.image or []]  # fail on a bad path before loading the model
    clips = [load_audio(p) for p in args.audio or []]
    vlm = load_model(args.run, _device(args.device))
    if clips and "audio" not in vlm.modalities:
        raise PillError(f"--audio: this model reads no audio (its encoders: {', '.join(vlm.modalities)}); "
                        "pass --run with a run trained with model.encoders.audio")
    inputs = {"audio": clips} if clips else {}
    session = ChatSession(vlm, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)
    prompt = " ".join(args.prompt).strip()
    if not prompt:
        interactive_chat(session, _stdin_lines(), sys.stdout, sys.stderr, images=images, inputs=inputs)
        return 0

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    session.ask(prompt, images, stream=write, inputs=inputs)
    sys.stdout.write("\n")
    return 0


def _run_config(run: Path):
    from ..runconfig import load_config

    return load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None


def _eval_scienceqa(args: argparse.Namespace) -> int:
    from ..build import load_model
    from ..errors import CheckpointError, ConfigError, PillError
    from .evaluate import evaluate_scienceqa
    from .scienceqa_score import format_table

    run = Path(args.run)
    cfg = _run_config(run)
    if cfg is None:
        raise CheckpointError(f"{run}: not a pill run directory (no config.yaml)")
    trained_on_sqa = cfg.data.format == "scienceqa"
    prompt_format = args.format or (cfg.data.prompt_format if trained_on_sqa else "QCM-A")
    use_caption = args.use_caption if args.use_caption is not None else bool(trained_on_sqa and cfg.data.use_caption)
    data = args.data or (cfg.data.root if trained_on_sqa else None)
    if not data:
        raise ConfigError("--data: required (the run was not trained on ScienceQA, so it names no data root)")
    from ..data.prompts import parse_format

    try:
        parse_format(prompt_format)  # before the model is loaded
    except PillError as e:
        raise ConfigError(f"--format {prompt_format}: {e}") from None
    if args.protocol == "reference" and args.mode != "generate":
        raise ConfigError("--protocol reference: the reference generates its answers; drop --mode likelihood")
    if args.protocol == "reference" and cfg.data.prompt_style != "reference":
        print(f"note: {run} was trained with data.prompt_style {cfg.data.prompt_style}; --protocol reference "
              "asks with the reference's prompts", file=sys.stderr)
    vlm = load_model(str(run), _device(args.device))
    suffix = "" if args.protocol == "pill" else f"-{args.protocol}"
    out = Path(args.out) if args.out else run / f"eval-{args.split}{suffix}"
    result = evaluate_scienceqa(vlm, data, args.split, prompt_format=prompt_format, limit=args.limit,
                                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, mode=args.mode,
                                out_dir=out, use_caption=use_caption, protocol=args.protocol, seed=args.seed)
    print(f"ScienceQA {args.split}, format {prompt_format}, mode {args.mode}, protocol {args.protocol}: "
          f"{result['count']} problems in {result['seconds']:.1f} s\n")
    print(format_table(result))
    print()
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0


def _eval_mme(args: argparse.Namespace) -> int:
    from ..build import load_model
    from ..errors import CheckpointError
    from .mme import evaluate_mme, load_mme
    from .mme_score import format_scores

    run = Path(args.run)
    if _run_config(run) is None:
        raise CheckpointError(f"{run}: not a pill run directory (no config.yaml)")
    load_mme(args.data, args.subtask)  # a malformed benchmark folder fails before the model loads
    vlm = load_model(str(run), _device(args.device))
    suffix = "" if args.protocol == "pill" else f"-{args.protocol}"
    out = Path(args.out) if args.out else run / f"eval-mme{suffix}"
    result = evaluate_mme(vlm, args.data, out, subtasks=args.subtask, protocol=args.protocol,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                          limit=args.limit)
    print(f"MME, protocol {args.protocol}: {sum(s['questions'] for s in result['subtasks'].values())} questions "
          f"in {result['seconds']:.1f} s, results in {out}\n")
    print(format_scores(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval scienceqa``, ``eval mme`` and ``chat`` to the ``pill`` parser."""
    ev = subparsers.add_parser("eval", help="run a model on a benchmark and score it")
    ev_sub = ev.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    sqa = ev_sub.add_parser("scienceqa", help="answer a ScienceQA split, write predictions and generations, score",
                            description="Answer a ScienceQA split with a trained run, write RUN/eval-SPLIT/"
                                        "{predictions.json,generations.jsonl,scores.json} and print the scores.")
    sqa.add_argument("--run", required=True, metavar="DIR", help="a finished training run (config.yaml + pill.safetensors)")
    sqa.add_argument("--data", metavar="ROOT",
                     help="ScienceQA folder or parquet export (default: the run's data.root when it trained on ScienceQA)")
    sqa.add_argument("--split", default="test", help="split of pid_splits.json (default: test)")
    sqa.add_argument("--limit", type=int, metavar="N", help="only the first N problems of the split")
    sqa.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per batch (default: 8)")
    sqa.add_argument("--format", metavar="FMT",
                     help="prompt format, e.g. QCM-A, QCM-ALE (default: the run's data.prompt_format, else QCM-A)")
    sqa.add_argument("--mode", choices=["generate", "likelihood"], default="generate",
                     help="generate: greedy decoding + answer extraction (as the papers); likelihood: rank the "
                          "option letters by log P(letter | prompt, 'The answer is'), one forward pass per batch")
    sqa.add_argument("--protocol", choices=["pill", "reference"], default="pill",
                     help="pill: the run's prompts, --mode decoding, an unreadable answer counts as wrong; "
                          "reference: as the reference code's eval_sqa.py (its prompts, sampling at T 0.1 / "
                          "top-p 0.75, up to 512 tokens, the regex 'The answer is ([A-Z]).', a seeded random "
                          "option where it finds none). Both report the unparsed answers")
    sqa.add_argument("--seed", type=int, default=0,
                     help="--protocol reference: seed of the sampling and of the random fallback (default: 0)")
    sqa.add_argument("--out", metavar="DIR",
                     help="output folder (default: RUN/eval-SPLIT, RUN/eval-SPLIT-reference with --protocol reference)")
    sqa.add_argument("--max-new-tokens", type=int, metavar="N",
                     help="generation length (default: 8 for output format A, 256 with lecture/explanation; "
                          "512 with --protocol reference)")
    sqa.add_argument("--use-caption", action=argparse.BooleanOptionalAction, default=None,
                     help="add captions.json captions to the context (default: as the run was trained)")
    sqa.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    sqa.set_defaults(func=_eval_scienceqa)

    mme = ev_sub.add_parser("mme", help="answer MME's yes/no questions, write the official results files, score",
                            description="Answer the questions of MME (the MME_Benchmark_release_version folder) "
                                        "with a trained run, write one official results file per subtask "
                                        "(image, question, ground truth, answer; tab-separated) to "
                                        "RUN/eval-mme and print the official scores.")
    mme.add_argument("--run", required=True, metavar="DIR", help="a finished training run")
    mme.add_argument("--data", required=True, metavar="MME_ROOT",
                     help="the benchmark folder holding one folder per subtask")
    mme.add_argument("--subtask", action="append", metavar="NAME",
                     help="only this subtask (repeatable; default: every official subtask found)")
    mme.add_argument("--protocol", choices=["pill", "reference"], default="pill",
                     help="pill: the run's chat template, greedy; reference: as the reference code's eval_mme.py "
                          "([INST] image question [/INST], sampling at T 0.1 / top-p 0.75, 512 tokens)")
    mme.add_argument("--seed", type=int, default=0, help="--protocol reference: sampling seed (default: 0)")
    mme.add_argument("--limit", type=int, metavar="N", help="only the first N images of each subtask")
    mme.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per batch (default: 8)")
    mme.add_argument("--max-new-tokens", type=int, metavar="N",
                     help="answer length (default: 16; 512 with --protocol reference)")
    mme.add_argument("--out", metavar="DIR", help="results folder (default: RUN/eval-mme)")
    mme.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    mme.set_defaults(func=_eval_mme)

    chat = subparsers.add_parser("chat", help="ask a model about images; interactive without a prompt",
                                 description="Stream a model's answer to PROMPT about the --image files. "
                                             "Without PROMPT: an interactive multi-turn session on stdin.")
    chat.add_argument("prompt", nargs="*", metavar="PROMPT", help="the question (several words are joined)")
    chat.add_argument("--run", metavar="DIR",
                      help="a finished training run (default: the embedded model with untrained plug-ins)")
    chat.add_argument("--image", action="append", metavar="PATH", help="an image for the first message (repeatable)")
    chat.add_argument("--audio", action="append", metavar="PATH",
                      help="an audio clip (WAV, FLAC, ...) for the first message (repeatable; needs a run with audio)")
    chat.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="answer length limit (default: 256)")
    chat.add_argument("--temperature", type=float, default=0.0, metavar="T",
                      help="0 for greedy decoding (default), > 0 to sample")
    chat.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling threshold (default: 1.0)")
    chat.add_argument("--seed", type=int, metavar="S", help="seed for sampling")
    chat.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    chat.set_defaults(func=_chat)
