"""A run's identity, declared once: which config fields change what a run computes, and every hash built on it
(run ids, run-folder names, resume and cache keys).

A dataclass field is one of three kinds, set on the field itself (`field(metadata=...)` through `outside()` or
`runtime()` below; a plain field is a result field):

- result:  changes the numbers (bits, lr, the data, the seed, ...). Part of every identity.
- schedule: a result field that only decides when training evaluates or stops, never what a step computes
           (eval_every; max_steps under a constant learning rate). Part of run ids, left out of resume keys:
           editing it continues a run's training instead of restarting it.
- runtime: changes how fast or how often, never what (threads, log/checkpoint cadence, cache use, workers).
           Left out of run folders, the report's grouping, resume keys and cache keys.
- outside: not part of the experiment at all (where results go, how they are logged, what a sweep optimises,
           how many unreadable files a run tolerates). Left out of every identity.

`identity_dict(cfg)` is a typed config with only its result fields, recursively; every hash reads it, so a
new runtime knob is declared where it is defined and no list elsewhere can forget it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

RESULT, SCHEDULE, RUNTIME, OUTSIDE = "result", "schedule", "runtime", "outside"
_META = "qspeech_identity"
_NO = dataclasses.MISSING

__all__ = ["OUTSIDE", "RESULT", "RUNTIME", "SCHEDULE", "field_kind", "identity_dict", "outside", "run_id", "run_name",
           "runtime", "schedule", "stable_hash"]


def _field(kind: str, default, default_factory):
    if default_factory is not _NO:
        return dataclasses.field(default_factory=default_factory, metadata={_META: kind})
    return dataclasses.field(default=default, metadata={_META: kind})


def runtime(default=_NO, *, default_factory=_NO):
    """A dataclass field that changes how fast or how often a run works, never its numbers."""
    return _field(RUNTIME, default, default_factory)


def schedule(default=_NO, *, default_factory=_NO):
    """A dataclass field that decides when training evaluates or stops, never what a step computes."""
    return _field(SCHEDULE, default, default_factory)


def outside(default=_NO, *, default_factory=_NO):
    """A dataclass field that is not part of the experiment (output places, logging, sweep objective)."""
    return _field(OUTSIDE, default, default_factory)


def field_kind(f: dataclasses.Field) -> str:
    return f.metadata.get(_META, RESULT)


def identity_dict(obj: Any, drop: tuple[str, ...] = (RUNTIME, OUTSIDE)) -> Any:
    """`obj` as plain JSON-able data without the fields whose kind is in `drop` (dataclasses recursively,
    mappings and lists element-wise)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: identity_dict(getattr(obj, f.name), drop) for f in dataclasses.fields(obj)
                if field_kind(f) not in drop}
    if isinstance(obj, Mapping):
        return {str(k): identity_dict(v, drop) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [identity_dict(v, drop) for v in obj]
    return obj


def stable_hash(obj: Any, n: int = 16) -> str:
    """The first `n` hex digits of sha256 over `obj` as canonical JSON (sorted keys, str() for the rest)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def run_id(cfg: Any) -> str:
    """8 hex digits that name an experiment: the same result fields, the same run folder (so a killed run
    rerun with the same command resumes there), whatever the runtime and outside settings."""
    return stable_hash(identity_dict(cfg), 8)


def run_name(cfg: Any) -> str:
    """The run folder's name: <model>[-<init>]_<fp|method>_b<bits>_<task>_<data>_<run_id>."""
    quant = "fp" if int(cfg.bits) >= 32 else cfg.quant.method
    init = "" if cfg.model.init == "pretrained" else f"-{cfg.model.init}"
    return f"{cfg.model.name}{init}_{quant}_b{cfg.bits}_{cfg.task.name}_{cfg.data.name}_{run_id(cfg)}"
