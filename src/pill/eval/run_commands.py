"""Talking to a model and measuring it: ``pill chat`` and ``pill eval scienceqa``.

The library side of ``pill chat`` lives here too: :class:`ChatSession` (multi-turn, images
in any turn, streamed answers), :func:`chat_session` (one question, one answer) and
:func:`interactive_chat` (the read-answer loop). In Python::

    from pill.inference import load_run
    from pill.eval.run_commands import chat_session
    chat_session(load_run("runs/demo/finetune"), "What colour is the circle?", ["shapes.png"], stream=print)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, TextIO

UNTRAINED_NOTE = (
    "note: no --run given, so this is the embedded default model (SmolLM2-135M-Instruct + EfficientNet-Lite0) "
    "with untrained plug-ins: the image pathway has learned nothing yet and answers cannot use what an image "
    "shows. Train a run and pass --run DIR."
)
INTERACTIVE_HELP = ("type a message and press Enter; '/image PATH' attaches an image to your next message, "
                    "'/clear' starts a new conversation, 'exit' or Ctrl-D quits")


# -- chat, as a library -----------------------------------------------------------------------

class ChatSession:
    """A multi-turn conversation with a :class:`~pill.vlm.PillVLM`.

    Each turn renders the whole history with the model's chat template (as in training),
    puts ``<image>`` placeholders in front of the prompt for the images given with that
    turn, and feeds every image of the conversation, in order, to the model.

    Args:
        vlm: a PillVLM with a tokenizer.
        max_new_tokens: answer length limit per turn.
        temperature: 0 for greedy decoding, > 0 to sample (with ``top_p``).
        seed: seed of the sampling generator (sampling only).
        template: chat template name or string (default: the tokenizer's own).
        system_prompt: system message of the conversation (default: ``vlm.system_prompt``, which
            :func:`~pill.inference.load_run` sets to the run's; None there: the template's default).
    """

    def __init__(self, vlm, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: Optional[int] = None, template: Optional[str] = None, system_prompt: Optional[str] = None):
        from ..errors import ConfigError, PillError

        if vlm.processor is None:
            raise PillError("the model has no tokenizer; build PillVLM with one")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ConfigError(f"temperature: must be >= 0, got {temperature}")
        self.vlm = vlm
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.template = template
        self.system_prompt = system_prompt if system_prompt is not None else getattr(vlm, "system_prompt", None)
        self.generator = None
        if seed is not None and temperature > 0:
            import torch

            self.generator = torch.Generator(device=vlm.device).manual_seed(seed)
        self.messages: list[dict] = []
        self.images: list = []  # PIL images of the whole conversation, in placeholder order

    def clear(self) -> None:
        """Forget the conversation (messages and images)."""
        self.messages, self.images = [], []

    def ask(self, prompt: str, images: Sequence = (), stream: Optional[Callable[[str], None]] = None) -> str:
        """Answer ``prompt`` about ``images`` (paths, bytes or PIL images) given the history.

        ``stream(piece)`` receives the answer text as it is produced; the pieces join to the
        returned string. The turn is added to the history.
        """
        import torch
        from PIL import Image

        from ..data.images import load_image
        from ..data.prompts import render_chat

        imgs = [img if isinstance(img, Image.Image) else load_image(img) for img in images]
        missing = len(imgs) - prompt.count("<image>")
        if missing > 0:
            prompt = "<image>\n" * missing + prompt
        messages = self.messages + [{"role": "user", "content": prompt}]
        all_images = self.images + imgs
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        text = render_chat(self.vlm.tokenizer, system + messages, self.template, add_generation_prompt=True)
        batch = self.vlm.processor([text], [all_images])  # (1, T); pixel_values (N, 3, H, W)
        tokenizer = self.vlm.tokenizer
        eos = self.vlm._eos_ids(None)
        tokens: list[int] = []
        shown = ""
        finished = False

        def on_token(token: torch.Tensor) -> None:  # token: (1,)
            nonlocal shown, finished
            t = int(token[0])
            if finished or t in eos:
                finished = True
                return
            tokens.append(t)
            now = tokenizer.decode(tokens, skip_special_tokens=True)
            # a multi-byte character split across tokens decodes to U+FFFD until it is complete
            if now.startswith(shown) and len(now) > len(shown) and not now.endswith("\ufffd"):
                piece, shown = now[len(shown):], now
                if stream is not None:
                    stream(piece)

        with torch.no_grad():
            self.vlm.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                              temperature=self.temperature or 1.0, top_p=self.top_p, streamer=on_token,
                              generator=self.generator)
        final = tokenizer.decode(tokens, skip_special_tokens=True)
        if final.startswith(shown) and len(final) > len(shown):
            if stream is not None:
                stream(final[len(shown):])
            shown = final
        self.messages = messages + [{"role": "assistant", "content": shown.strip()}]
        self.images = all_images
        return shown


def chat_session(vlm, prompt: str, images: Sequence = (), *, max_new_tokens: int = 256, temperature: float = 0.0,
                 stream: Optional[Callable[[str], None]] = None, **kwargs) -> str:
    """Ask ``vlm`` one question about ``images`` (paths or PIL images); returns the answer text.

    ``stream(piece)`` receives the answer as it is generated; the pieces join to the answer.
    Further keyword arguments go to :class:`ChatSession` (``top_p``, ``seed``, ``template``).
    """
    return ChatSession(vlm, max_new_tokens=max_new_tokens, temperature=temperature, **kwargs).ask(
        prompt, images, stream=stream)


def interactive_chat(session: ChatSession, lines: Iterable[str], out: TextIO = sys.stdout,
                     err: TextIO = sys.stderr, images: Sequence = ()) -> int:
    """Read messages from ``lines`` and stream each answer to ``out`` until EOF or ``exit``.

    Commands: ``/image PATH`` attaches an image to the next message, ``/clear`` starts a new
    conversation, ``/help``, ``exit`` / ``quit``. ``images`` are attached to the first message.
    Prompts, notes and errors (a bad image path, ...) go to ``err``; only answers go to ``out``.
    Returns the number of answered turns.
    """
    from ..data.images import load_image
    from ..errors import PillError

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    pending = list(images)
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
            pending = []
            print("(conversation cleared)", file=err)
            continue
        if text.split()[0] == "/image":
            path = text[len("/image"):].strip().strip("'\"")
            if not path:
                print("usage: /image PATH", file=err)
                continue
            try:
                pending.append(load_image(path))
            except PillError as e:
                print(f"error: {e}", file=err)
                continue
            print(f"(image attached to your next message: {path})", file=err)
            continue
        try:
            session.ask(text, pending, stream=write)
        except PillError as e:
            print(f"error: {e}", file=err)
            continue
        out.write("\n")
        out.flush()
        pending = []
        turns += 1
    return turns


# -- command handlers -------------------------------------------------------------------------

def _device(name: Optional[str]) -> str:
    if name:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(run: Optional[str], device: str):
    """The run's model (:func:`pill.inference.load_run`), or the embedded default with untrained plug-ins."""
    if run:
        from .. import inference

        return inference.load_run(run, device=device)
    from ..vlm import PillVLM

    print(UNTRAINED_NOTE, file=sys.stderr)
    vlm = PillVLM.from_pretrained(device=device)
    vlm.eval()
    return vlm


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
    from ..data.images import load_image

    images = [load_image(p) for p in args.image or []]  # fail on a bad path before loading the model
    vlm = _load_model(args.run, _device(args.device))
    session = ChatSession(vlm, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)
    prompt = " ".join(args.prompt).strip()
    if not prompt:
        interactive_chat(session, _stdin_lines(), sys.stdout, sys.stderr, images=images)
        return 0

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    session.ask(prompt, images, stream=write)
    sys.stdout.write("\n")
    return 0


def _run_config(run: Path):
    from ..train.config import load_config

    return load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None


def _eval_scienceqa(args: argparse.Namespace) -> int:
    from ..errors import CheckpointError, ConfigError
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
    vlm = _load_model(str(run), _device(args.device))
    out = Path(args.out) if args.out else run / f"eval-{args.split}"
    result = evaluate_scienceqa(vlm, data, args.split, prompt_format=prompt_format, limit=args.limit,
                                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, mode=args.mode,
                                out_dir=out, use_caption=use_caption)
    print(f"ScienceQA {args.split}, format {prompt_format}, mode {args.mode}: {result['count']} problems "
          f"in {result['seconds']:.1f} s\n")
    print(format_table(result))
    print()
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval scienceqa`` and ``chat`` to the ``pill`` parser."""
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
    sqa.add_argument("--out", metavar="DIR", help="output folder (default: RUN/eval-SPLIT)")
    sqa.add_argument("--max-new-tokens", type=int, metavar="N",
                     help="generation length (default: 8 for output format A, 256 with lecture/explanation)")
    sqa.add_argument("--use-caption", action=argparse.BooleanOptionalAction, default=None,
                     help="add captions.json captions to the context (default: as the run was trained)")
    sqa.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    sqa.set_defaults(func=_eval_scienceqa)

    chat = subparsers.add_parser("chat", help="ask a model about images; interactive without a prompt",
                                 description="Stream a model's answer to PROMPT about the --image files. "
                                             "Without PROMPT: an interactive multi-turn session on stdin.")
    chat.add_argument("prompt", nargs="*", metavar="PROMPT", help="the question (several words are joined)")
    chat.add_argument("--run", metavar="DIR",
                      help="a finished training run (default: the embedded model with untrained plug-ins)")
    chat.add_argument("--image", action="append", metavar="PATH", help="an image for the first message (repeatable)")
    chat.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="answer length limit (default: 256)")
    chat.add_argument("--temperature", type=float, default=0.0, metavar="T",
                      help="0 for greedy decoding (default), > 0 to sample")
    chat.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling threshold (default: 1.0)")
    chat.add_argument("--seed", type=int, metavar="S", help="seed for sampling")
    chat.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    chat.set_defaults(func=_chat)
