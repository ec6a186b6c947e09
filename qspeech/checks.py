"""Value checks for the config dataclasses, and building those dataclasses from a composed config.

A dataclass checks its own fields in `__post_init__` with the helpers below; they raise FieldError, which
names the field relative to the dataclass. `instantiate` builds the dataclasses of a composed OmegaConf
node bottom-up (as OmegaConf.to_object does) and puts the node's path in front, so the user reads the full
key: "train.max_steps=-1: must be an integer >= 1". OmegaConf's own type errors become the same kind of
line (`describe`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from qspeech.errors import ConfigError

__all__ = ["FieldError", "choice", "describe", "instantiate", "integer", "need", "number", "pair", "show",
           "typed"]

_NO_VALUE = object()


def show(value: Any) -> str:
    """A value as the user writes it on the command line (null, true, [a,b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def _join(path: str, key: str) -> str:
    if not path or not key:
        return path or key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


class FieldError(ConfigError):
    """A bad value of field `key` (relative to its dataclass; "" = the dataclass as a whole). `why` is
    shown after "key=value: ", or after "key=value " when it is a sentence that starts with "is "."""

    def __init__(self, key: str, why: str, value: Any = _NO_VALUE):
        self.key, self.why, self.value = key, why, value
        super().__init__(self.under(""))

    def under(self, path: str) -> str:
        key = _join(path, self.key)
        if self.value is _NO_VALUE:
            return f"{key}: {self.why}"
        return f"{key}={show(self.value)}{' ' if self.why.startswith('is ') else ': '}{self.why}"


def need(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise FieldError(key, why, value)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def _within(v, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))


def integer(cfg, name: str, lo: int | None = None, hi: int | None = None, *, optional: bool = False) -> None:
    """Field `name` of `cfg` is an integer in [lo, hi] (or null when optional)."""
    v = getattr(cfg, name)
    if v is None and optional:
        return
    need(_is_int(v) and _within(v, lo, hi, False, False), name, v,
         f"must be {'null or ' if optional else ''}an integer{_bounds(lo, hi, False, False)}")


def number(cfg, name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, optional: bool = False) -> None:
    """Field `name` of `cfg` is a number in the interval (ends open or closed; or null when optional)."""
    v = getattr(cfg, name)
    if v is None and optional:
        return
    need(_is_num(v) and _within(v, lo, hi, lo_open, hi_open), name, v,
         f"must be {'null or ' if optional else ''}a number{_bounds(lo, hi, lo_open, hi_open)}")


def choice(cfg, name: str, options) -> None:
    """Field `name` of `cfg` is one of `options`."""
    v = getattr(cfg, name)
    need(any(v == o and type(v) is type(o) for o in options), name, v,
         f"choose {' or '.join(show(o) for o in options)}" if len(options) <= 2
         else f"choose one of {', '.join(show(o) for o in options)}")


def pair(cfg, name: str, lo: float, hi: float, *, optional: bool = False) -> None:
    """Field `name` of `cfg` is a [low, high] pair of numbers with lo <= low <= high <= hi."""
    v = getattr(cfg, name)
    if v is None and optional:
        return
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(x) for x in v) and lo <= v[0] <= v[1] <= hi
    need(ok, name, v, f"must be {'null or ' if optional else ''}[low, high] with {lo} <= low <= high <= {hi}")


# ------------------------------------------------------------------------------- building the dataclasses
def instantiate(node: Any, path: str = "") -> Any:
    """OmegaConf.to_object(node) with the full key in every error: each dataclass is built after its fields,
    a FieldError of its __post_init__ is reported under the node's path, and a key the dataclass does not
    have is an error (to_object would set it as an attribute)."""
    if isinstance(node, ListConfig):
        return [instantiate(v, _join(path, f"[{i}]")) for i, v in _items(node, path)]
    if not isinstance(node, DictConfig):
        return node
    values = {k: instantiate(v, _join(path, str(k))) for k, v in _items(node, path)}
    cls = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(cls):
        return values
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names), key=str)
    if unknown:
        raise ConfigError(f"{_join(path, str(unknown[0]))}: unknown key; known keys: {', '.join(names)}")
    try:
        return cls(**values)
    except FieldError as e:
        raise ConfigError(e.under(path)) from None


def _items(node, path: str):
    """(key, value) pairs of a DictConfig / ListConfig, interpolations resolved."""
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    out = []
    for k in keys:
        try:
            out.append((k, node[k]))
        except OmegaConfBaseException as e:
            raise ConfigError(describe(e, key=_join(path, f"[{k}]" if isinstance(k, int) else str(k)))) from None
    return out


def typed(schema: type, data: Any, path: str = "") -> Any:
    """The dataclass `schema` filled in from a mapping (dict, DictConfig, a conf/ YAML file loaded with
    OmegaConf.load), with the composed config's checks: types by OmegaConf, values by __post_init__.
    `path` prefixes the keys in errors (e.g. "train")."""
    if isinstance(data, schema):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or schema.__name__}: expected a mapping of settings, got {type(data).__name__}")
    if "defaults" in data:  # a conf/ file loaded without Hydra: its defaults list names the schema, no setting
        data = {k: v for k, v in data.items() if k != "defaults"}
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), data)
    except OmegaConfBaseException as e:
        raise ConfigError(describe(e, path)) from None
    return instantiate(node, path)


# ------------------------------------------------------------------------------- OmegaConf's errors
_TYPE_WORDS = {"int": "an integer", "integer": "an integer", "float": "a number", "bool": "true or false",
               "boolean": "true or false", "str": "a string", "string": "a string"}


def describe(e: OmegaConfBaseException, path: str = "", key: str | None = None) -> str:
    """One line for an OmegaConf type / key error, naming the full key: `key`, else path + the error's key."""
    key = key if key is not None else _join(path, str(getattr(e, "full_key", "") or ""))
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    value = getattr(e, "value", None)
    m = re.search(r"could not be converted to (\w+)", msg)
    if m:
        return f"{key}={show(value)}: must be {_TYPE_WORDS.get(m.group(1).lower(), m.group(1))}"
    if "is not a ListConfig" in msg:
        return f"{key}={show(value)}: must be a list, e.g. {key}=[{show(value)}]"
    if "is not a DictConfig" in msg or "is not a subclass of" in msg:
        return f"{key}={show(value)}: must be a mapping, e.g. {key}={{name: value}}"
    if "is not Optional" in msg or "cannot be assigned None" in msg:
        return f"{key}: must not be null"
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and re.search(r"Key '.*' (is )?not in", msg):
        cls = getattr(e, "object_type", None)
        known = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        return f"{key}: unknown key" + (f"; known keys: {', '.join(known)}" if known else "")
    if "Missing mandatory value" in msg:
        return f"{key}: missing value; set {key}=..."
    return f"{key}: {msg}" if key else msg
