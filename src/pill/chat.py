"""The one chat path: the library (:meth:`pill.vlm.PillVLM.chat`), ``pill chat`` and the web demo.

:class:`ChatSession` holds a multi-turn conversation: each turn renders the whole history with the
model's chat template (:func:`pill.data.prompts.render_chat`, exactly as training renders it),
puts one placeholder in front of the prompt for each input given with that turn that the prompt
does not mention, feeds every input of the conversation, in order, to the model, and streams
the answer. A conversation longer than the model's context loses its oldest exchanges (and the
inputs they brought), with a notice; a question that alone does not fit is refused::

    from pill.build import load_run
    from pill.chat import ChatSession
    session = ChatSession(load_run("runs/demo/finetune"))
    session.ask("What colour is the circle?", ["shapes.png"], stream=print)
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from .errors import ConfigError, PillError
from .modalities import modality

# a tokenizer without a known limit reports this sentinel (transformers' VERY_LARGE_INTEGER)
_UNKNOWN_LENGTH = 10**9


class ContextError(PillError):
    """The new question (with its inputs) does not fit into the model's context."""


def context_length(vlm) -> Optional[int]:
    """Tokens ``vlm`` reads at most: the smaller of the LLM's ``max_position_embeddings`` and the
    tokenizer's ``model_max_length``, of those that are known (None: neither is)."""
    known = [getattr(getattr(vlm, "llm", None) and vlm.llm.config, "max_position_embeddings", None),
             getattr(getattr(vlm, "tokenizer", None), "model_max_length", None)]
    known = [int(n) for n in known if isinstance(n, int) and 0 < n < _UNKNOWN_LENGTH]
    return min(known) if known else None


class ChatSession:
    """A multi-turn conversation with a :class:`~pill.vlm.PillVLM`.

    Args:
        vlm: a PillVLM with a tokenizer.
        max_new_tokens: answer length limit per turn.
        temperature: 0 for greedy decoding, > 0 to sample (with ``top_p``).
        seed: seed of the sampling generator (sampling only).
        template: chat template name or string (default: ``vlm.chat_template``, which
            :func:`~pill.build.load_run` sets for a run trained in the reference prompt style; else
            the tokenizer's own).
        system_prompt: system message of the conversation (default: ``vlm.system_prompt``, which
            :func:`~pill.build.load_run` sets to the run's; None there: the template's default).
        history: earlier ``{role, content}`` turns to continue from.
        inputs: the inputs of ``history`` by modality name, in order (paths, bytes or decoded), one
            per placeholder; without them the history may hold no placeholders.
    """

    def __init__(self, vlm, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: Optional[int] = None, template: Optional[str] = None, system_prompt: Optional[str] = None,
                 history: Optional[Sequence[dict]] = None, inputs: Optional[dict[str, Sequence]] = None):
        if vlm.processor is None:
            raise PillError("the model has no tokenizer; build PillVLM with one")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ConfigError(f"temperature: must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {top_p}")
        self.vlm = vlm
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.template = template if template is not None else getattr(vlm, "chat_template", None)
        self.system_prompt = system_prompt if system_prompt is not None else getattr(vlm, "system_prompt", None)
        self.generator = None
        if seed is not None and temperature > 0:
            import torch

            self.generator = torch.Generator(device=vlm.device).manual_seed(seed)
        self.messages: list[dict] = []
        self.inputs: dict[str, list] = {}  # decoded inputs of the whole conversation, by modality, in order
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}  # of the last answer
        self.finish_reason = None  # of the last answer: "stop" (end of text) or "length"
        if history:
            self._check_history(history, inputs or {})
            self.messages = [dict(m) for m in history]
            self.inputs = {name: self._decode(name, items) for name, items in (inputs or {}).items() if items}

    @property
    def images(self) -> list:
        return self.inputs.get("image", [])

    def clear(self) -> None:
        """Forget the conversation (messages and inputs)."""
        self.messages, self.inputs = [], {}

    def _check_history(self, history: Sequence[dict], inputs: dict[str, Sequence]) -> None:
        for name in inputs:
            if name not in self.vlm.modalities:
                raise PillError(f"this model reads no {name} inputs (its encoders: {', '.join(self.vlm.modalities)})")
        for m in self.vlm.modalities.values():
            n = sum(h.get("content", "").count(m.placeholder) for h in history)
            if n != len(inputs.get(m.name, [])):
                raise PillError(f"the earlier turns hold {n} {m.placeholder} placeholder(s) but "
                                f"{len(inputs.get(m.name, []))} {m.label}(s) were given with them")

    @staticmethod
    def _decode(name: str, items: Sequence) -> list:
        """Paths and encoded bytes are read with the modality's loader; decoded inputs (a PIL image)
        pass through."""
        import os

        m = modality(name)
        return [m.load(x) if isinstance(x, (str, bytes, bytearray, os.PathLike)) else x for x in items]

    def context_length(self) -> Optional[int]:
        """Tokens the model reads at most (:func:`context_length`)."""
        return context_length(self.vlm)

    def ask(self, prompt: str, images: Sequence = (), stream: Optional[Callable[[str], None]] = None,
            inputs: Optional[dict[str, Sequence]] = None, notice: Optional[Callable[[str], None]] = None) -> str:
        """Answer ``prompt`` about ``images`` (paths, bytes or PIL images) and ``inputs`` (other
        modalities by name) given the history.

        ``stream(piece)`` receives the answer text as it is produced; the pieces join to the
        returned string. The turn is added to the history. When the conversation and the answer
        (``max_new_tokens``) would not fit into :meth:`context_length`, the oldest exchanges and
        their inputs are left out and ``notice(message)`` says so; a question that does not fit
        alone raises :class:`ContextError`.
        """
        given = {**({k: list(v) for k, v in (inputs or {}).items()}), **({"image": list(images)} if images else {})}
        decoded = {}
        for name, items in given.items():
            if name not in self.vlm.modalities:
                raise PillError(f"this model reads no {name} inputs (its encoders: {', '.join(self.vlm.modalities)})")
            decoded[name] = self._decode(name, items)
            missing = len(items) - prompt.count(self.vlm.modalities[name].placeholder)
            if missing > 0:
                prompt = f"{self.vlm.modalities[name].placeholder}\n" * missing + prompt
        messages = self.messages + [{"role": "user", "content": prompt}]
        every = {n: self.inputs.get(n, []) + decoded.get(n, []) for n in set(self.inputs) | set(decoded)}
        text, messages, every, max_new_tokens = self._fit(messages, every, notice)
        batch = self.vlm.processor([text], [every.get("image", [])],
                                   inputs=[{n: v for n, v in every.items() if n != "image"}])
        shown = self._generate(batch, stream, max_new_tokens)
        self.messages = messages + [{"role": "assistant", "content": shown.strip()}]
        self.inputs = every
        return shown

    def _fit(self, messages: list[dict], every: dict[str, list], notice: Optional[Callable[[str], None]]):
        """The rendered prompt, messages, inputs and answer budget that fit into the context."""
        limit = self.context_length()
        dropped = 0
        while True:
            text = self._render(messages)
            if limit is None:
                return text, messages, every, self.max_new_tokens
            n = len(self.vlm.processor.tokenize(text))  # placeholders count as their slot tokens
            if n + self.max_new_tokens <= limit or (len(messages) == 1 and n < limit):
                break
            if len(messages) == 1:
                raise ContextError(f"the question is {n} tokens long with its inputs and the chat template; "
                                   f"it does not fit into the model's context of {limit} tokens")
            # leave out the oldest exchange (its user turn and the answer to it) and the inputs it brought
            cut = next((i for i in range(1, len(messages)) if messages[i]["role"] == "user"), len(messages) - 1)
            for m in messages[:cut]:
                for name, mod in self.vlm.modalities.items():
                    k = m["content"].count(mod.placeholder)
                    if k and name in every:
                        every = {**every, name: every[name][k:]}
            messages = messages[cut:]
            dropped += 1
        max_new_tokens = min(self.max_new_tokens, limit - n)
        if notice is not None and (dropped or max_new_tokens < self.max_new_tokens):
            parts = []
            if dropped:
                parts.append(f"the oldest {dropped} exchange{'s' if dropped > 1 else ''} of the conversation "
                             f"{'were' if dropped > 1 else 'was'} left out")
            if max_new_tokens < self.max_new_tokens:
                parts.append(f"the answer is limited to {max_new_tokens} tokens")
            notice(f"The model reads at most {limit} tokens: {' and '.join(parts)}.")
        return text, messages, every, max_new_tokens

    def _render(self, messages: list[dict]) -> str:
        from .data.prompts import render_chat

        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return render_chat(self.vlm.tokenizer, system + messages, self.template, add_generation_prompt=True)

    def _generate(self, batch: dict, stream: Optional[Callable[[str], None]], max_new_tokens: int) -> str:
        import torch

        tokenizer = self.vlm.tokenizer
        eos = self.vlm.eos_token_ids()
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
            self.vlm.generate(**batch, max_new_tokens=max_new_tokens, do_sample=self.temperature > 0,
                              temperature=self.temperature or 1.0, top_p=self.top_p, streamer=on_token,
                              generator=self.generator)
        self.usage = {"prompt_tokens": int(batch["input_ids"].shape[1]), "completion_tokens": len(tokens)}
        self.finish_reason = "stop" if finished else "length"
        final = tokenizer.decode(tokens, skip_special_tokens=True)
        if final.startswith(shown) and len(final) > len(shown):
            if stream is not None:
                stream(final[len(shown):])
            shown = final
        return shown


def chat_session(vlm, prompt: str, images: Sequence = (), *, max_new_tokens: int = 256, temperature: float = 0.0,
                 stream: Optional[Callable[[str], None]] = None, **kwargs) -> str:
    """Ask ``vlm`` one question about ``images`` (paths or PIL images); returns the answer text.

    ``stream(piece)`` receives the answer as it is generated; the pieces join to the answer.
    Further keyword arguments go to :class:`ChatSession` (``top_p``, ``seed``, ``template``).
    """
    return ChatSession(vlm, max_new_tokens=max_new_tokens, temperature=temperature, **kwargs).ask(
        prompt, images, stream=stream)


__all__ = ["ChatSession", "ContextError", "chat_session", "context_length"]
