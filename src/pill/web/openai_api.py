"""An OpenAI-compatible Chat Completions endpoint for ``pill serve``: ``POST /v1/chat/completions``
and ``GET /v1/models``, so the official ``openai`` client (and tools built on it) can talk to a
PILL model.

Messages come in OpenAI's shape: ``content`` is a string or a list of parts, ``{"type": "text",
"text"}`` and ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``. Only
``data:`` URLs of PNG or JPEG images are read: fetching a remote URL would let any request make
the server call any address. A model that reads audio also takes ``{"type": "input_audio",
"input_audio": {"data": base64, "format": "wav"}}`` parts (WAV, FLAC or OGG, decoded by the audio
modality's loader). An input sits where its part is (its placeholder goes there), in earlier
turns too. The answer comes through the same :class:`~pill.chat.ChatSession` as the page
and ``pill chat``, under the same limits and queue. Errors are OpenAI's error object
``{"error": {message, type, param, code}}``.
"""
from __future__ import annotations

import base64
import binascii
import math
import secrets
import time
from typing import Any, Callable, Optional

from .app import SETTINGS, RequestError, read_json_object

MAX_IMAGES = 8  # images in one request, all turns together
MAX_CLIPS = 8  # audio clips in one request, all turns together
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")


class ApiError(RequestError):
    """A refused API request: HTTP ``status`` and the fields of OpenAI's error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: Optional[str] = None):
        super().__init__(status, message)
        self.param, self.code = param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def as_api_error(e: RequestError) -> ApiError:
    """A page error (queue full, upload too large, ...) in the API's shape."""
    if isinstance(e, ApiError):
        return e
    code = {401: "invalid_api_key", 403: "forbidden", 404: "not_found", 411: "length_required",
            413: "request_too_large", 415: "unsupported_media_type", 503: "server_busy"}.get(e.status)
    return ApiError(e.status, str(e), code=code)


def model_id(info: dict) -> str:
    """The name the served model goes by: its run directory, or ``pill-default-untrained``."""
    return info.get("run_dir") or "pill-default-untrained"


def models_reply(info: dict, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id(info), "object": "model", "created": created,
                                        "owned_by": "pill"}]}


def _number(req: dict, name: str, lo: float, hi: float, default, whole: bool = False):
    value = req.get(name)
    if value is None:
        return default
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or not math.isfinite(value) or (whole and not float(value).is_integer()):
        raise ApiError(400, f"{name} must be {'a whole number' if whole else 'a number'}, got {value!r}", name,
                       "invalid_value")
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value}", name, "invalid_value")
    return int(value) if whole else float(value)


def parse_request(body: bytes, app, served_model: str) -> dict:
    """A Chat Completions request -> ``{history, history_inputs, question, images, settings, stream,
    include_usage}``; the images are decoded with the image modality's loader. ApiError names the
    bad field."""
    req = read_json_object(body, ApiError)
    model = req.get("model")
    if model != served_model:
        raise ApiError(404, f"the model {model!r} is not served here; this server serves {served_model!r}",
                       "model", "model_not_found")
    if req.get("n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported", "n", "invalid_value")
    for unsupported in ("tools", "functions", "logprobs", "response_format"):
        if req.get(unsupported):
            raise ApiError(400, f"{unsupported} is not supported by this server", unsupported, "unsupported_parameter")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream", "invalid_value")
    options = req.get("stream_options") or {}
    hi_tokens = SETTINGS["max_new_tokens"][2]
    key = "max_completion_tokens" if req.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(req, key, 1, hi_tokens, SETTINGS["max_new_tokens"][3], whole=True)
    temperature = _number(req, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(req, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be above 0", "top_p", "invalid_value")
    seed = _number(req, "seed", -2**63, 2**63 - 1, None, whole=True)
    system, history, inputs = _messages(req.get("messages"), app)
    question = history.pop()
    earlier, now = {}, {}
    for name, items in inputs.items():  # the last message's inputs are asked about; the rest are history
        n_now = question["content"].count(app.modalities[name].placeholder)
        if items[:len(items) - n_now]:
            earlier[name] = items[:len(items) - n_now]
        if n_now:
            now[name] = items[len(items) - n_now:]
    if system is not None:
        history.insert(0, {"role": "system", "content": system})
    return {"history": history, "history_inputs": earlier,
            "question": question["content"], "images": now.pop("image", []), "inputs": now,
            "settings": {"max_new_tokens": max_tokens, "do_sample": temperature > 0, "temperature": temperature,
                         "top_p": top_p, "seed": seed},
            "stream": stream, "include_usage": bool(isinstance(options, dict) and options.get("include_usage"))}


def _messages(raw: Any, app) -> tuple[Optional[str], list[dict], dict[str, list]]:
    """OpenAI messages -> (system text, [{role, content with placeholders}], decoded inputs in order by
    modality: ``image`` from image_url parts, ``audio`` from input_audio parts)."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list", "messages", "invalid_value")
    if "image" not in app.modalities:
        raise ApiError(400, "this model reads no images", "messages", "invalid_value")
    limits = app.limits
    system, out, inputs = None, [], {"image": [], **({"audio": []} if "audio" in app.modalities else {})}
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"{where} must be {{role: system|user|assistant, content}}", f"{where}.role",
                           "invalid_value")
        role = "system" if m["role"] == "developer" else m["role"]
        text = _content(m.get("content"), where, role, inputs, app)
        if len(text) > limits.max_message_chars:
            raise ApiError(400, f"{where} is longer than {limits.max_message_chars} characters", f"{where}.content",
                           "string_above_max_length")
        if role == "system":
            if out or system is not None:
                raise ApiError(400, f"{where}: a system message goes first", f"{where}.role", "invalid_value")
            system = text
            continue
        expected = "user" if len(out) % 2 == 0 else "assistant"
        if role != expected:
            raise ApiError(400, f"{where}: expected a {expected} message (turns alternate, starting and ending "
                                "with the user)", f"{where}.role", "invalid_value")
        out.append({"role": role, "content": text})
    if not out or out[-1]["role"] != "user":
        raise ApiError(400, "the last message must come from the user", "messages", "invalid_value")
    if len(out) > limits.max_history_messages + 1:
        raise ApiError(400, f"the conversation is too long ({len(out)} messages, at most "
                            f"{limits.max_history_messages + 1})", "messages", "invalid_value")
    last = out[-1]["content"]
    for name in inputs:
        last = last.replace(app.modalities[name].placeholder, "")
    if not last.strip():
        raise ApiError(400, "the last user message has no text", "messages", "invalid_value")
    return system, out, inputs


def _content(content: Any, where: str, role: str, inputs: dict[str, list], app) -> str:
    if isinstance(content, str):
        text = content
        parts = []
    elif isinstance(content, list):
        text, parts = None, content
    else:
        raise ApiError(400, f"{where}.content must be a string or a list of parts", f"{where}.content",
                       "invalid_value")
    for m in app.modalities.values():  # typed placeholders are text, not inputs
        if text is not None and m.placeholder in text:
            raise ApiError(400, f"{where}: remove {m.placeholder!r} from the text; send images as image_url parts",
                           f"{where}.content", "invalid_value")
    if text is not None:
        return text
    pieces = []
    for j, part in enumerate(parts):
        pwhere = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if any(m.placeholder in part["text"] for m in app.modalities.values()):
                raise ApiError(400, f"{pwhere}: remove the placeholder from the text; send images as image_url "
                                    "parts", f"{pwhere}.text", "invalid_value")
            pieces.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise ApiError(400, f"{pwhere}: images go in user messages", f"{pwhere}.type", "invalid_value")
            if len(inputs["image"]) >= MAX_IMAGES:
                raise ApiError(400, f"at most {MAX_IMAGES} images per request", pwhere, "invalid_value")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            inputs["image"].append(_data_url_image(url, f"{pwhere}.image_url.url", app))
            pieces.append(app.modalities["image"].placeholder)
        elif kind == "input_audio":
            if "audio" not in inputs:
                raise ApiError(400, f"{pwhere}: this model reads no audio", f"{pwhere}.type", "invalid_value")
            if role != "user":
                raise ApiError(400, f"{pwhere}: audio goes in user messages", f"{pwhere}.type", "invalid_value")
            if len(inputs["audio"]) >= MAX_CLIPS:
                raise ApiError(400, f"at most {MAX_CLIPS} audio clips per request", pwhere, "invalid_value")
            inputs["audio"].append(_input_audio(part.get("input_audio"), f"{pwhere}.input_audio", app))
            pieces.append(app.modalities["audio"].placeholder)
        else:
            raise ApiError(400, f"{pwhere}: unsupported content part {kind!r} (text, image_url and input_audio "
                                "are read)", f"{pwhere}.type", "invalid_value")
    return "\n".join(pieces)


def _data_url_image(url: Any, param: str, app):
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ApiError(400, "only data: URLs with a base64 PNG or JPEG are read; this server does not fetch "
                            "remote images", param, "invalid_image_url")
    header, sep, data = url[5:].partition(",")
    media, _, encoding = header.partition(";")
    if not sep or encoding != "base64" or media.lower() not in IMAGE_TYPES:
        raise ApiError(400, "the image must be a data:image/png;base64,... or data:image/jpeg;base64,... URL",
                       param, "invalid_image_url")
    limit = app.limits.upload_bytes("image")
    if len(data) > 4 * (limit + 2) // 3:
        raise ApiError(413, f"the image is larger than the limit of {limit / 2**20:.1f} MB", param,
                       "image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image data is not valid base64", param, "invalid_image") from None
    try:
        return app.decode("image", raw, param)
    except RequestError as e:
        raise ApiError(e.status, str(e), param, "invalid_image" if e.status == 400 else "image_too_large") from None


def _input_audio(part: Any, param: str, app):
    """An ``input_audio`` part (``{"data": base64, "format": "wav"|"mp3"|...}``) decoded by the audio
    modality's loader, within its upload limit."""
    if not isinstance(part, dict) or not isinstance(part.get("data"), str):
        raise ApiError(400, "input_audio must be {data: base64 audio, format: wav|flac|ogg|mp3}", param,
                       "invalid_value")
    fmt = str(part.get("format", "wav")).lower()
    limit = app.limits.upload_bytes("audio")
    if len(part["data"]) > 4 * (limit + 2) // 3:
        raise ApiError(413, f"the audio clip is larger than the limit of {limit / 2**20:.1f} MB", f"{param}.data",
                       "audio_too_large")
    try:
        raw = base64.b64decode(part["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the audio data is not valid base64", f"{param}.data", "invalid_audio") from None
    try:
        return app.decode("audio", raw, f"{param}.{fmt}")
    except RequestError as e:
        raise ApiError(e.status, str(e), f"{param}.data",
                       "invalid_audio" if e.status == 400 else "audio_too_large") from None


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def reply(cid: str, model: str, created: int, text: str, finish: str, usage: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}}


def chunk(cid: str, model: str, created: int, delta: dict, finish: Optional[str] = None,
          usage: Optional[dict] = None) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if usage is not None:
        out["choices"] = []
        out["usage"] = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    return out


def run(app, request: dict, on_piece: Optional[Callable[[str], None]] = None) -> tuple[str, str, dict]:
    """Answer a :func:`parse_request` result with the model (waiting for its turn); returns
    ``(text, finish_reason, usage)``. ``on_piece(text)`` receives the answer as it is produced."""
    from ..chat import ChatSession, ContextError
    from ..errors import PillError

    s = request["settings"]
    with app.model_turn():
        try:
            session = ChatSession(app.vlm, max_new_tokens=s["max_new_tokens"],
                                  temperature=s["temperature"] if s["do_sample"] else 0.0, top_p=s["top_p"],
                                  seed=s["seed"], system_prompt=_system(request), history=_turns(request),
                                  inputs=request["history_inputs"])
            text = session.ask(request["question"], request["images"], inputs=request.get("inputs"),
                               stream=on_piece)
        except ContextError as e:
            raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        except PillError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
    return text.strip(), session.finish_reason or "stop", dict(session.usage)


def _system(request: dict) -> Optional[str]:
    h = request["history"]
    return h[0]["content"] if h and h[0]["role"] == "system" else None


def _turns(request: dict) -> list[dict]:
    h = request["history"]
    return h[1:] if h and h[0]["role"] == "system" else h


def now() -> int:
    return int(time.time())
