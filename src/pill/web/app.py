"""The demo's logic without HTTP: request validation, uploaded images, one model behind a lock.

:class:`DemoApp` is what :mod:`pill.web.server` serves. It holds one model, answers one
question at a time (others wait in a bounded queue), and turns every bad input into a
:class:`RequestError` whose message is shown on the page.
"""
from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..data.images import load_image
from ..chat import ContextError, context_length
from ..errors import DataError
from ..modalities import IMAGE_PLACEHOLDER

log = logging.getLogger("pill.web")

STORED_IMAGE_SIDE = 1024  # uploads are kept at most this big: every VPG reads 224-384 px

# Generation settings the page may send: name -> (type, minimum, maximum, default).
SETTINGS = {
    "max_new_tokens": (int, 1, 512, 128),
    "greedy": (bool, None, None, True),
    "temperature": (float, 0.05, 2.0, 0.7),
    "top_p": (float, 0.05, 1.0, 0.9),
}


class RequestError(Exception):
    """A request the demo refuses; ``status`` is the HTTP code, the message is shown on the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The browser closed the connection while its answer was being written."""


@dataclass(frozen=True)
class Limits:
    """Upload, text and queue limits; each is checked on the server whatever the page does."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096
    max_question_chars: int = 2000
    max_history_messages: int = 32  # 16 earlier question/answer pairs
    max_message_chars: int = 8000
    max_waiting: int = 8  # requests queued behind the one being served (questions, uploads); more get HTTP 503
    max_images: int = 32  # uploads kept in memory, least recently used dropped first

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


def validate_settings(raw: Any) -> dict:
    """Page settings -> keyword arguments of ``PillVLM.chat``; RequestError names a bad field.

    ``raw``: ``{max_new_tokens: int, greedy: bool, temperature: float, top_p: float}``, any
    subset (defaults fill the rest). Returns ``{max_new_tokens, do_sample, temperature, top_p}``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RequestError(400, "settings must be an object")
    unknown = sorted(set(raw) - set(SETTINGS))
    if unknown:
        raise RequestError(400, f"unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    out = {}
    for name, (kind, lo, hi, default) in SETTINGS.items():
        value = raw.get(name, default)
        if kind is bool:
            if not isinstance(value, bool):
                raise RequestError(400, f"setting {name} must be true or false, got {value!r}")
        else:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is int and not (numeric and float(value).is_integer()):
                raise RequestError(400, f"setting {name} must be a whole number, got {value!r}")
            if not numeric or not math.isfinite(value):
                raise RequestError(400, f"setting {name} must be a number, got {value!r}")
            value = kind(value)
            if not lo <= value <= hi:
                raise RequestError(400, f"setting {name} must be between {lo} and {hi}, got {value}")
        out[name] = value
    return {"max_new_tokens": out["max_new_tokens"], "do_sample": not out["greedy"],
            "temperature": out["temperature"], "top_p": out["top_p"]}


def validate_history(raw: Any, limits: Limits) -> list[dict]:
    """Earlier turns ``[{role: user|assistant, content: str}, ...]``, alternating from ``user``.

    ``<image>`` in earlier turns is neutralised: the image is attached to the new question.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RequestError(400, "history must be a list of {role, content} messages")
    if len(raw) > limits.max_history_messages:
        raise RequestError(400, f"the conversation is too long ({len(raw)} messages, at most "
                                f"{limits.max_history_messages}); press Clear to start again")
    out = []
    for i, m in enumerate(raw):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != expected or not isinstance(m.get("content"), str):
            raise RequestError(400, f"history message {i} must be {{role: {expected!r}, content: text}}")
        if len(m["content"]) > limits.max_message_chars:
            raise RequestError(400, f"history message {i} is longer than {limits.max_message_chars} characters")
        out.append({"role": expected, "content": m["content"].replace(IMAGE_PLACEHOLDER, "(image)")})
    if len(out) % 2:
        raise RequestError(400, "history must end with an assistant message")
    return out


def model_info(vlm, llm: Optional[str] = None, vpg: Optional[str] = None, run_dir=None,
               stages: Optional[list] = None) -> dict:
    """What the side panel shows. Explicit arguments win over ``vlm.run_info`` (set by ``load_run``).

    Returns ``{llm, vpg, run_dir, stages, trained, parameters: [{part, parameters, trainable}]}``;
    ``trained`` is True when the model came from a run directory.
    """
    run = dict(getattr(vlm, "run_info", None) or {})
    run_dir = run_dir if run_dir is not None else run.get("run_dir")
    if llm is None:
        cfg = vlm.llm.config
        llm = run.get("llm") or getattr(cfg, "_name_or_path", "") or \
            f"{cfg.model_type} ({cfg.num_hidden_layers} layers, width {cfg.hidden_size})"
    if vpg is None:
        vpg = run.get("vpg") or getattr(vlm.vpg, "name", type(vlm.vpg).__name__)
    stages = stages if stages is not None else run.get("stages", [])
    return {"llm": str(llm), "vpg": str(vpg), "run_dir": None if run_dir is None else str(run_dir),
            "stages": [_stage_label(s) for s in stages], "trained": run_dir is not None,
            "parameters": vlm.parameter_table()}


def _stage_label(stage) -> str:
    if isinstance(stage, dict):
        name = stage.get("name") or stage.get("stage") or "stage"
        extra = ", ".join(f"{k} {v}" for k, v in stage.items() if k not in ("name", "stage")
                          and isinstance(v, (int, float, str)))
        return f"{name} ({extra})" if extra else str(name)
    return str(stage)


def gate_plot(run_dir) -> Optional[bytes]:
    """PNG bytes of the run's gate plot: ``gates.png``, else drawn from ``gates.json``, else None."""
    if run_dir is None:
        return None
    run = Path(run_dir)
    if (run / "gates.png").is_file():
        return (run / "gates.png").read_bytes()
    if (run / "gates.json").is_file():
        import tempfile

        try:
            from ..eval.plots import plot_gates, read_gates

            layers, values, variant = read_gates(run / "gates.json")
            with tempfile.TemporaryDirectory() as tmp:
                out = plot_gates(values, Path(tmp) / "gates.png", layers=layers,
                                 title="Mean |tanh(gate)| per layer" + (f" ({variant} gate)" if variant else ""))
                return out.read_bytes()
        except Exception as e:  # a broken gates.json must not stop the demo
            log.warning("no gate plot: %s", e)
    return None


class DemoApp:
    """One model, one question at a time.

    Args:
        vlm: a :class:`~pill.vlm.PillVLM` (anything with its ``chat`` method serves in tests).
        info: the side panel's content (:func:`model_info`); built from ``vlm`` when None.
        limits: upload, text and queue limits.
    """

    def __init__(self, vlm, info: Optional[dict] = None, limits: Optional[Limits] = None):
        self.vlm = vlm
        self.info = info if info is not None else model_info(vlm)
        self.limits = limits or Limits()
        self.gate_png = gate_plot(self.info.get("run_dir"))
        self._model_lock = threading.Lock()  # the model runs one request at a time
        self._decode_lock = threading.Lock()  # uploads are decoded one at a time
        self._state_lock = threading.Lock()  # guards the fields below
        self._admitted = 0  # requests in the queue: answering, waiting for the model, decoding an upload
        self._waiting = 0  # questions waiting for the model
        self._images: OrderedDict[str, Any] = OrderedDict()

    def public_info(self) -> dict:
        """``/api/info``: the model, the limits and the settings' ranges and defaults."""
        return {**self.info, "gate_plot": self.gate_png is not None,
                "limits": {"max_upload_bytes": self.limits.max_upload_bytes, "max_pixels": self.limits.max_pixels,
                           "max_question_chars": self.limits.max_question_chars,
                           "max_history_messages": self.limits.max_history_messages,
                           "context_tokens": self.context_tokens()},
                "settings": {name: {"min": lo, "max": hi, "default": default}
                             for name, (_, lo, hi, default) in SETTINGS.items()}}

    def context_tokens(self) -> Optional[int]:
        """The model's context in tokens (:meth:`pill.chat.ChatSession.context_length`), None if unknown."""
        return context_length(self.vlm)

    @contextmanager
    def admission(self):
        """A place in the queue (the request being served + ``max_waiting``), held while a request
        is decoded, waits and is answered; RequestError 503 when the queue is full. The server
        takes it before it reads an upload or a question, so refused requests are never decoded."""
        with self._state_lock:
            if self._admitted >= 1 + self.limits.max_waiting:
                raise RequestError(503, f"the server is busy ({self._admitted - 1} requests waiting); "
                                        "try again shortly")
            self._admitted += 1
        try:
            yield
        finally:
            with self._state_lock:
                self._admitted -= 1

    # -- images ------------------------------------------------------------------------------
    def add_image(self, data: bytes, name: str = "upload") -> dict:
        """Decode an upload and keep it; returns ``{image_id, width, height}`` of the original."""
        if len(data) > self.limits.max_upload_bytes:
            raise RequestError(413, too_large_message(len(data), self.limits.max_upload_bytes))
        if not data:
            raise RequestError(400, f"{name}: the file is empty")
        try:
            with self._decode_lock:  # one decoded upload in memory at a time, whatever arrives at once
                img = load_image(bytes(data), max_pixels=self.limits.max_pixels, name=name)
        except DataError as e:
            raise RequestError(400, str(e)) from None
        width, height = img.size
        img.thumbnail((STORED_IMAGE_SIDE, STORED_IMAGE_SIDE))
        image_id = secrets.token_urlsafe(12)
        with self._state_lock:
            self._images[image_id] = img
            while len(self._images) > self.limits.max_images:
                self._images.popitem(last=False)
        return {"image_id": image_id, "width": width, "height": height}

    def get_image(self, image_id):
        if image_id is None:
            return None
        with self._state_lock:
            img = self._images.get(image_id) if isinstance(image_id, str) else None
            if img is None:
                raise RequestError(410, "that image is no longer on the server (it restarted or dropped "
                                        "old uploads); upload it again")
            self._images.move_to_end(image_id)
            return img

    # -- questions -----------------------------------------------------------------------------
    def parse_question(self, body: bytes) -> dict:
        """JSON ``{question, image_id?, history?, settings?}`` -> checked chat arguments."""
        try:
            req = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"the request is not valid JSON ({e})") from None
        except RecursionError:
            raise RequestError(400, "the request is not valid JSON (nested too deeply)") from None
        if not isinstance(req, dict):
            raise RequestError(400, "the request must be a JSON object")
        question = req.get("question")
        if not isinstance(question, str) or not question.strip():
            raise RequestError(400, "type a question first")
        if len(question) > self.limits.max_question_chars:
            raise RequestError(400, f"the question is {len(question)} characters long; the limit is "
                                    f"{self.limits.max_question_chars}")
        if IMAGE_PLACEHOLDER in question:
            raise RequestError(400, f"remove {IMAGE_PLACEHOLDER!r} from the question: the image is attached for you")
        return {"question": question.strip(), "image": self.get_image(req.get("image_id")),
                "history": validate_history(req.get("history"), self.limits),
                "settings": validate_settings(req.get("settings"))}

    def answer(self, request: dict, emit: Callable[[str, Any], None]) -> str:
        """Answer a :meth:`parse_question` result, streaming through ``emit(event, data)``; call it
        within :meth:`admission`, which bounds the queue.

        Events: ``queued {ahead}`` while another question is being answered, ``start``, ``notice
        {message}`` when the conversation was cut to the model's context, then ``token "text"``
        pieces. Returns the answer; exceptions (including :class:`ClientGone` from ``emit``)
        propagate after the model is released.
        """
        with self._state_lock:
            free = self._model_lock.acquire(blocking=False)
            if not free:
                self._waiting += 1
                ahead = self._waiting  # the question being answered + those queued before this one
        if not free:
            try:
                emit("queued", {"ahead": ahead})
                self._model_lock.acquire()
            finally:
                with self._state_lock:
                    self._waiting -= 1
        try:
            t0 = time.perf_counter()
            images = [request["image"]] if request["image"] is not None else []
            begun = []

            def send(event: str, data) -> None:  # "start" goes first, once the prompt is known to fit
                if not begun:
                    begun.append(True)
                    emit("start", {})
                if event:
                    emit(event, data)

            try:
                answer = self.vlm.chat(request["question"], images=images, history=request["history"],
                                       stream=lambda piece: send("token", piece),
                                       notice=lambda message: send("notice", {"message": message}),
                                       **request["settings"])
            except ContextError as e:  # before "start": a plain 400 the page shows as an error
                raise RequestError(400, f"{e}; shorten the question") from None
            except Exception:
                send("", None)  # a failing model is reported as an error event of a started answer
                raise
            send("", None)
            log.info("answered in %.1f s", time.perf_counter() - t0)
            return answer
        finally:
            self._model_lock.release()

    @property
    def busy(self) -> bool:
        return self._model_lock.locked()


def too_large_message(size: int, limit: int, what: str = "file") -> str:
    return f"the {what} is {size / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB"
