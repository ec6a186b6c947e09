"""Typed records written as JSON (result.json, a task's metrics, cost.json): dataclasses with one serializer.

`Record.to_dict` gives the JSON-able dict (nested records included); `Record.from_dict` reads one back. Files
written by an older version may lack fields that have a default, and keys a record does not know are ignored,
so the report keeps reading old run folders; a missing required field or a value of the wrong type is a
ValueError (the report lists such files as problems).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

R = TypeVar("R", bound="Record")


def optional(default: Any = None) -> Any:
    """A field left out of the dict while it is None: a stage that did not run writes no key."""
    return dataclasses.field(default=default, metadata={"omit_none": True})


def transient(default: Any = None) -> Any:
    """A field the reader fills in (e.g. the run folder), never written and never read from the file."""
    return dataclasses.field(default=default, compare=False, metadata={"transient": True})


def renamed(key: str, **kw) -> Any:
    """A field stored under another key in the file."""
    return dataclasses.field(metadata={"key": key}, **kw)


class Record:
    """Mixin for dataclasses: to_dict / from_dict."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("transient") or (value is None and f.metadata.get("omit_none")):
                continue
            out[f.metadata.get("key", f.name)] = _plain(value)
        return out

    @classmethod
    def from_dict(cls: type[R], data: Mapping) -> R:
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        kwargs, missing = {}, []
        for f in dataclasses.fields(cls):
            key = f.metadata.get("key", f.name)
            if f.metadata.get("transient") or not f.init:
                continue
            if key in data:
                kwargs[f.name] = _load(hints[f.name], data[key], f"{cls.__name__}.{key}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                missing.append(key)
        if missing:
            raise ValueError(f"{cls.__name__}: missing {'/'.join(missing)}")
        return cls(**kwargs)


def _plain(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_SCALARS = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def _load(hint, value, where: str):
    """`value` from JSON as the field's type says: nested records are built, scalars and containers checked."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))  # our fields are `X | None` at most
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    if isinstance(origin, type) and issubclass(origin, Record):
        return origin.from_dict(value)
    if origin is list and isinstance(value, list):
        return [_load(args[0], v, where) for v in value] if args else value
    ok = _SCALARS.get(origin, (origin,)) if isinstance(origin, type) else (object,)
    if not isinstance(value, ok) or (isinstance(value, bool) and origin in (int, float)):
        raise ValueError(f"{where}={value!r}: expected {getattr(origin, '__name__', origin)}")
    return value
