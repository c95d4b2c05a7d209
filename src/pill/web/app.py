"""The demo's logic without HTTP: request validation, uploaded inputs, one model behind a lock.

:class:`DemoApp` is what :mod:`pill.web.server` serves. It holds one model, answers one
question at a time (others wait in a bounded queue), and turns every bad input into a
:class:`RequestError` whose message is shown on the page. Uploads of every modality the model
has an encoder for (:mod:`pill.modalities`: image, and any registered other) are decoded with
that modality's own loader, under its own size limit.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..chat import ContextError, context_length
from ..errors import DataError
from ..modalities import Modality, modalities, modality

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


def read_json_object(body: bytes, error: type = None) -> dict:
    """A request body that must be one JSON object; anything else is ``error`` (RequestError or a
    subclass) with status 400: not UTF-8, not JSON, nested too deeply, not an object."""
    error = error or RequestError
    try:
        req = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(400, f"the request is not valid JSON ({e})") from None
    except RecursionError:
        raise error(400, "the request is not valid JSON (nested too deeply)") from None
    if not isinstance(req, dict):
        raise error(400, "the request must be a JSON object")
    return req


class ClientGone(Exception):
    """The browser closed the connection while its answer was being written."""


@dataclass(frozen=True)
class Limits:
    """Upload, text and queue limits; each is checked on the server whatever the page does.

    ``max_upload_bytes`` caps an upload of any modality; ``max_input_bytes`` (modality name ->
    bytes) sets another cap for some. ``max_pixels`` is the image modality's own limit.
    """

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096
    max_question_chars: int = 2000
    max_history_messages: int = 32  # 16 earlier question/answer pairs
    max_message_chars: int = 8000
    max_waiting: int = 8  # requests queued behind the one being served (questions, uploads); more get HTTP 503
    max_inputs: int = 32  # uploads (of every modality) kept in memory, least recently used dropped first
    max_input_bytes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        values = {k: v for k, v in self.__dict__.items() if k != "max_input_bytes"}
        values.update({f"max_input_bytes[{k!r}]": v for k, v in self.max_input_bytes.items()})
        for name, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")

    def upload_bytes(self, name: str) -> int:
        """The largest upload of modality ``name``, in bytes."""
        return self.max_input_bytes.get(name, self.max_upload_bytes)

    def load_options(self, name: str) -> dict:
        """Keyword arguments for modality ``name``'s loader: the image's pixel limit and stored size."""
        return {"max_pixels": self.max_pixels, "max_side": STORED_IMAGE_SIDE} if name == "image" else {}


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

    Placeholders (``<image>``, ...) in earlier turns are neutralised: inputs come with the new question.
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
        content = m["content"]
        for mod in modalities():
            content = content.replace(mod.placeholder, f"({mod.label})")
        out.append({"role": expected, "content": content})
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
        encoders = getattr(vlm, "encoders", None)  # stand-ins in tests have only vpg
        image = vlm.vpg if encoders is None else encoders["image"] if "image" in encoders else None
        vpg = run.get("vpg") or ("none" if image is None else getattr(image, "name", type(image).__name__))
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
        self._inputs: OrderedDict[str, tuple[str, Any]] = OrderedDict()  # id -> (modality name, decoded)
        # the modalities the model has encoders for, image first (a stand-in without any: images)
        served = getattr(vlm, "modalities", None) or {"image": modality("image")}
        self.modalities: dict[str, Modality] = dict(sorted(served.items(), key=lambda kv: kv[1].id))

    def public_info(self) -> dict:
        """``/api/info``: the model, the limits and the settings' ranges and defaults."""
        return {**self.info, "gate_plot": self.gate_png is not None,
                "limits": {"max_upload_bytes": self.limits.max_upload_bytes, "max_pixels": self.limits.max_pixels,
                           "max_question_chars": self.limits.max_question_chars,
                           "max_history_messages": self.limits.max_history_messages,
                           "context_tokens": self.context_tokens()},
                "modalities": [self._modality_info(m) for m in self.modalities.values()],
                "settings": {name: {"min": lo, "max": hi, "default": default}
                             for name, (_, lo, hi, default) in SETTINGS.items()}}

    def _modality_info(self, m: Modality) -> dict:
        info = {"name": m.name, "label": m.label, "placeholder": m.placeholder,
                "accept": f"{m.mime}/*" if m.mime else "", "max_upload_bytes": self.limits.upload_bytes(m.name)}
        seconds = self.max_seconds(m.name)
        return {**info, "max_seconds": seconds} if seconds else info

    def max_seconds(self, name: str) -> Optional[float]:
        """The longest clip the model's encoder of modality ``name`` reads (audio), else None."""
        encoders = getattr(self.vlm, "encoders", None)
        encoder = encoders[name] if encoders is not None and name in encoders else None
        value = getattr(encoder, "max_seconds", None)
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

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

    # -- uploads ------------------------------------------------------------------------------
    def served(self, name: Any) -> Modality:
        """The modality ``name`` if the model reads it, else RequestError 404."""
        m = self.modalities.get(name) if isinstance(name, str) else None
        if m is None:
            raise RequestError(404, f"this model reads no {name} inputs (it reads: {', '.join(self.modalities)})")
        return m

    def accepts(self, name: str, content_type: str) -> bool:
        """Whether an upload of modality ``name`` may be sent as ``content_type``: ``<mime>/*`` or
        ``application/octet-stream``, neither of which a page elsewhere can send without a preflight."""
        mime = self.served(name).mime
        return content_type == "application/octet-stream" or bool(mime) and content_type.startswith(mime + "/")

    def decode(self, name: str, data: bytes, filename: str = "upload"):
        """One upload of modality ``name`` decoded by the modality's own loader, one at a time;
        RequestError (413, 400) names the file."""
        m = self.served(name)
        limit = self.limits.upload_bytes(name)
        if len(data) > limit:
            raise RequestError(413, too_large_message(len(data), limit, f"{m.label} file"))
        if not data:
            raise RequestError(400, f"{filename}: the file is empty")
        try:
            with self._decode_lock:  # one decoded upload in memory at a time, whatever arrives at once
                return m.load(bytes(data), name=filename, **self.limits.load_options(name))
        except DataError as e:
            raise RequestError(400, str(e)) from None

    def add_input(self, name: str, data: bytes, filename: str = "upload") -> dict:
        """Decode an upload of modality ``name`` and keep it; returns ``{input_id, modality, name}``
        and what the modality's ``describe`` says about it (an image: width, height, summary)."""
        m = self.served(name)
        decoded = self.decode(name, data, filename)
        limit, seconds = self.max_seconds(name), getattr(decoded, "seconds", None)
        if limit is not None and isinstance(seconds, float) and seconds > limit:
            raise RequestError(400, f"{filename}: {seconds:.1f} s of audio; this model reads at most {limit:g} s "
                                    "per clip")
        facts = m.describe(decoded) if m.describe is not None else {}
        input_id = secrets.token_urlsafe(12)
        with self._state_lock:
            self._inputs[input_id] = (name, decoded)
            while len(self._inputs) > self.limits.max_inputs:
                self._inputs.popitem(last=False)
        return {"input_id": input_id, "modality": name, "name": filename, **facts}

    def get_input(self, name: str, input_id):
        """The decoded upload ``input_id`` of modality ``name``; RequestError 410 once it is dropped."""
        m = self.served(name)
        with self._state_lock:
            kept = self._inputs.get(input_id) if isinstance(input_id, str) else None
            if kept is None or kept[0] != name:
                raise RequestError(410, f"that {m.label} is no longer on the server (it restarted or dropped "
                                        "old uploads); upload it again")
            self._inputs.move_to_end(input_id)
            return kept[1]

    def add_image(self, data: bytes, name: str = "upload") -> dict:
        """:meth:`add_input` for an image, its id also under ``image_id``."""
        reply = self.add_input("image", data, name)
        return {"image_id": reply["input_id"], **reply}

    def get_image(self, image_id):
        return None if image_id is None else self.get_input("image", image_id)

    def request_bytes(self, json_bytes: int) -> int:
        """The largest question body: ``json_bytes`` of text plus one base64 file per modality."""
        return json_bytes + sum(4 * (self.limits.upload_bytes(n) + 2) // 3 + 1024 for n in self.modalities)

    # -- questions -----------------------------------------------------------------------------
    def parse_question(self, body: bytes) -> dict:
        """JSON -> checked chat arguments, the inputs decoded.

        ``{question, history?, settings?, inputs?: {modality: input_id}, files?: {modality:
        {name, data: base64}}, image_id?}``: each modality's input is an earlier upload
        (``inputs``) or a file sent along (``files``, decoded here with the modality's loader);
        ``image_id`` is ``inputs.image``. Returns ``{question, inputs: {modality: [decoded]},
        history, settings}``.
        """
        req = read_json_object(body)
        question = req.get("question")
        if not isinstance(question, str) or not question.strip():
            raise RequestError(400, "type a question first")
        if len(question) > self.limits.max_question_chars:
            raise RequestError(400, f"the question is {len(question)} characters long; the limit is "
                                    f"{self.limits.max_question_chars}")
        for m in modalities():
            if m.placeholder in question:
                raise RequestError(400, f"remove {m.placeholder!r} from the question: the {m.label} is attached "
                                        "for you")
        history = validate_history(req.get("history"), self.limits)
        settings = validate_settings(req.get("settings"))
        ids, files = req.get("inputs") or {}, req.get("files") or {}
        if not isinstance(ids, dict) or not isinstance(files, dict):
            raise RequestError(400, "inputs and files must be objects keyed by modality name")
        if req.get("image_id") is not None:
            ids = {**ids, "image": req["image_id"]}
        inputs = {}
        for name in list(ids) + [n for n in files if n not in ids]:
            try:
                self.served(name)
            except RequestError as e:
                raise RequestError(400, str(e)) from None
            if name in ids and name in files:
                raise RequestError(400, f"{name}: give an uploaded input id or a file, not both")
            inputs[name] = [self.get_input(name, ids[name]) if name in ids else self._sent_file(name, files[name])]
        return {"question": question.strip(), "inputs": inputs, "history": history, "settings": settings}

    def _sent_file(self, name: str, sent: Any):
        if not isinstance(sent, dict) or not isinstance(sent.get("data"), str):
            raise RequestError(400, f"files.{name} must be {{name, data: base64}}")
        filename = str(sent.get("name") or "upload")[:200]
        try:
            data = base64.b64decode(sent["data"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"files.{name} ({filename}): data is not base64") from None
        return self.decode(name, data, filename)

    def answer(self, request: dict, emit: Callable[[str, Any], None]) -> str:
        """Answer a :meth:`parse_question` result, streaming through ``emit(event, data)``; call it
        within :meth:`admission`, which bounds the queue.

        Events: ``queued {ahead}`` while another question is being answered, ``start``, ``notice
        {message}`` when the conversation was cut to the model's context, then ``token "text"``
        pieces. Returns the answer; exceptions (including :class:`ClientGone` from ``emit``)
        propagate after the model is released.
        """
        with self.model_turn(lambda ahead: emit("queued", {"ahead": ahead})):
            t0 = time.perf_counter()
            inputs = dict(request["inputs"])
            images = inputs.pop("image", [])
            begun = []

            def send(event: str, data) -> None:  # "start" goes first, once the prompt is known to fit
                if not begun:
                    begun.append(True)
                    emit("start", {})
                if event:
                    emit(event, data)

            try:
                answer = self.vlm.chat(request["question"], images=images, inputs=inputs, history=request["history"],
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

    @contextmanager
    def model_turn(self, queued: Optional[Callable[[int], None]] = None):
        """Hold the model: at once when it is free, else after ``queued(ahead)`` and a wait (call
        it within :meth:`admission`, which bounds the queue)."""
        with self._state_lock:
            free = self._model_lock.acquire(blocking=False)
            if not free:
                self._waiting += 1
                ahead = self._waiting  # the question being answered + those queued before this one
        if not free:
            try:
                if queued is not None:
                    queued(ahead)
                self._model_lock.acquire()
            finally:
                with self._state_lock:
                    self._waiting -= 1
        try:
            yield
        finally:
            self._model_lock.release()

    @property
    def busy(self) -> bool:
        return self._model_lock.locked()


def too_large_message(size: int, limit: int, what: str = "file") -> str:
    return f"the {what} is {size / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB"
