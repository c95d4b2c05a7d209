"""Dataclass configs loaded from plain dicts / YAML, validated on load.

Every config in pill is a dataclass. :func:`from_dict` builds one from a mapping
and rejects unknown keys and values of the wrong type with an error that names
the field (``pill.adapter.r: expected int, got 'abc'``).
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError

T = typing.TypeVar("T")


# -- reading values by the type of the field they set ----------------------------------------------
# YAML 1.1 (PyYAML) reads `no` as False, `010` as 8 and `1e-3` as a string. pill reads YAML files and
# `--set key=value` overrides without guessing: an unquoted scalar stays text (``Plain``) until it
# reaches its field, and the field's type decides what the text means.

class Plain(str):
    """An unquoted scalar from YAML or ``--set``: its meaning comes from the field it sets."""


class _TypedLoader(yaml.SafeLoader):
    """SafeLoader without implicit typing: plain scalars load as :class:`Plain`, quoted ones as str."""


_TypedLoader.yaml_implicit_resolvers = {}


def _construct_str(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    value = loader.construct_scalar(node)
    return Plain(value) if node.style is None else value


_TypedLoader.add_constructor("tag:yaml.org,2002:str", _construct_str)


def load_yaml(text: str) -> Any:
    """Parse YAML ``text``; scalars keep their text (:class:`Plain`) until :func:`from_dict` types them."""
    return yaml.load(text, Loader=_TypedLoader)


def parse_override(text: str) -> Any:
    """The value of a ``--set key=value`` override: ``[a, b]`` / ``{k: v}`` flow collections and
    quoted strings are parsed as YAML; anything else is taken verbatim (``Answer: briefly`` too).
    An empty value is the empty string."""
    stripped = text.strip()
    if stripped == "":
        return ""
    if stripped[0] in "[{\"'":
        try:
            return load_yaml(stripped)
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse {text!r}: {str(e).splitlines()[0]}") from None
    return Plain(stripped)


_NULL = ("null", "Null", "NULL", "~", "")
_TRUE, _FALSE = ("true", "yes", "on", "y"), ("false", "no", "off", "n")
_INT = re.compile(r"[-+]?[0-9][0-9_]*")
_SPECIAL_FLOATS = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}


def _plain_int(text: str) -> Optional[int]:
    if _INT.fullmatch(text):
        return int(text.replace("_", ""), 10)  # 010 is ten: no YAML 1.1 octal
    if re.fullmatch(r"[-+]?0[xX][0-9a-fA-F_]+", text):
        return int(text.replace("_", ""), 16)
    try:
        f = float(text.replace("_", ""))
    except ValueError:
        return None
    return int(f) if math.isfinite(f) and f.is_integer() else None  # 1e3 -> 1000


def _plain_float(text: str) -> Optional[float]:
    if text.lower() in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[text.lower()]
    try:
        return float(text.replace("_", ""))
    except ValueError:
        n = _plain_int(text)  # 0x10
        return None if n is None else float(n)


def _accepted(tp: Any) -> str:
    """Words for the values a field accepts, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        parts = [_accepted(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return "a list"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp) or origin is dict:
        return "a mapping"
    return _type_name(tp)


def _coerce_plain(value: Plain, tp: Any, where: str) -> Any:
    """Read the unquoted text ``value`` as the type ``tp`` asks for."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    text = str(value)
    if tp is Any:
        return yaml.safe_load(text) if text else None
    if origin in (Union, types.UnionType):
        if type(None) in args and text in _NULL:
            return None
        options = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)  # text last
        reasons = []
        for a in options:
            try:
                return _coerce_plain(value, a, where)
            except ConfigError as e:
                reasons.append(str(e))
        if len(reasons) == 1 and "expected" not in reasons[0]:  # the value has the type but not a valid value
            raise ConfigError(reasons[0])
        raise ConfigError(f"{where}: expected {_accepted(tp)}, got {text!r}")
    if origin is Literal:
        for a in args:
            if isinstance(a, str) and a == text:
                return a
            if not isinstance(a, str) and not isinstance(a, bool) and isinstance(a, int) and _plain_int(text) == a:
                return a
        raise ConfigError(f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {text!r}")
    if origin in (list, tuple):  # `0,1,2` on the command line
        parts = [p.strip() for p in text.split(",")] if text.strip() else []
        inner = args[0] if args else Any
        return [_coerce_plain(Plain(p), inner, f"{where}[{i}]") for i, p in enumerate(parts)]
    if dataclasses.is_dataclass(tp):
        if text in _NULL:
            return from_dict(tp, None, where)
        raise ConfigError(f"{where}: expected a mapping, got {text!r}")
    if origin is dict:
        raise ConfigError(f"{where}: expected a mapping, got {text!r}")
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{where}: expected true or false (also yes/no, on/off), got {text!r}")
    if tp is int:
        n = _plain_int(text)
        if n is None:
            raise ConfigError(f"{where}: expected an integer, got {text!r}")
        return n
    if tp is float:
        f = _plain_float(text)
        if f is None:
            raise ConfigError(f"{where}: expected a number, got {text!r}")
        return _coerce(f, float, where)
    if tp is str:
        return text
    raise ConfigError(f"{where}: expected {_accepted(tp)}, got {text!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    if isinstance(value, Plain):
        return _coerce_plain(value, tp, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-3" as a string; accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str | None = None) -> T:
    """Build the dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError."""
    where = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field {', '.join(repr(u) for u in unknown)}; "
            f"valid fields: {', '.join(sorted(fields))}"
        )
    kwargs = {str(k): _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}.{e}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data view of a (nested) dataclass, for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


@dataclass
class PillConfig:
    """Which plug-ins go into the LLM and how they are shaped (design note, section 2).

    Fields:
        adapter: ``swiglu`` (default) or ``classic`` (``W_up(act(W_d z))``) for ablations.
        r: adapter hidden size.
        activation: activation of the classic adapter: ``gelu``, ``relu`` or ``none``.
        attn_adapter: put an adapter on the attention input of every plugged layer.
        momae: one FFN-input adapter expert per modality; ``False`` = one shared adapter.
        num_modalities: number of modality experts (text = 0, image = 1, ...).
        mag: gate the attention values of non-text tokens with ``tanh(g)``.
        gate: ``token`` (``g = W_gate a``, per token and KV head) or ``head``
            (one learned scalar per KV head and layer).
        layers: indices of the decoder layers to plug; ``None`` = all layers; ``[]`` = none: only
            the projector trains (LLaVA's stage 1, a baseline).
        init_std: std of the normal init of the adapters' down/gate projections.
        swiglu_gate_init: init of the SwiGLU adapter's gate projection ``W_g``: ``normal``
            (N(0, init_std), like ``W_d``) or ``torch_default`` (``nn.Linear``'s uniform init, as
            the reference code leaves it).
    """

    adapter: Literal["swiglu", "classic"] = "swiglu"
    r: int = 32
    activation: Literal["gelu", "relu", "none"] = "gelu"
    attn_adapter: bool = True
    momae: bool = True
    num_modalities: int = 2
    mag: bool = True
    gate: Literal["token", "head"] = "token"
    layers: Optional[list[int]] = None
    init_std: float = 0.02
    swiglu_gate_init: Literal["normal", "torch_default"] = "normal"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"r: must be >= 1, got {self.r}")
        if self.num_modalities < 2:
            raise ConfigError(f"num_modalities: must be >= 2 (text and image), got {self.num_modalities}")
        if self.init_std <= 0:
            raise ConfigError(f"init_std: must be > 0, got {self.init_std}")
        if self.layers is not None:
            if any(i < 0 for i in self.layers):
                raise ConfigError(f"layers: indices must be >= 0, got {self.layers}")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"layers: duplicate indices in {self.layers}")

    @classmethod
    def from_dict(cls, data: dict | None) -> "PillConfig":
        return from_dict(cls, data, "pill")

    def to_dict(self) -> dict:
        return to_dict(self)
