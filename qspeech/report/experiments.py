"""Which recorded config keys tell two experiments apart: the result fields of the schema (qspeech.identity),
walked through the dataclasses the recorded config was typed as (the quant method's and the task kind's own
classes). Runtime and outside fields never set two runs apart, and keys the schema no longer has (recorded by
an older version) are left out, so old and new runs of one experiment still group together."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing

from qspeech.config import RunConfig
from qspeech.identity import OUTSIDE, RUNTIME, field_kind
from qspeech.quant.config import QuantConfig
from qspeech.quant.registry import quant_schemas
from qspeech.tasks import TaskConfig, task_schemas

__all__ = ["SEED_KEY", "flat_config", "result_config"]

SEED_KEY = "seed"  # runs that differ only by it are aggregated (mean +- std over seeds)


@functools.cache
def _fields(schema: type) -> dict[str, tuple[dataclasses.Field, object]]:
    hints = typing.get_type_hints(schema)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(schema)}


def _schemas_of(hint, value: dict) -> tuple[type, ...]:
    """The dataclasses a recorded value was typed as: the field's (Optional unwrapped), or for a quant / task
    group the class of the recorded quant.method / task.kind (every method's or kind's class where the
    recorded one is missing or no longer known). Empty for a field that is no dataclass."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
        return ()
    for base, key, schemas in ((QuantConfig, "method", quant_schemas), (TaskConfig, "kind", task_schemas)):
        if issubclass(hint, base):
            known = schemas()
            return (known[value[key]],) if value.get(key) in known else tuple(known.values())
    return (hint,)


def result_config(config: dict, schemas: tuple[type, ...] = (RunConfig,)) -> dict:
    """The recorded config (result.json's `config`) with only the result fields of `schemas`, recursively:
    a key is kept where a schema declares it and none declares it runtime or outside."""
    out = {}
    for key, value in config.items():
        declared = [_fields(s)[key] for s in schemas if key in _fields(s)]
        if not declared or any(field_kind(f) in (RUNTIME, OUTSIDE) for f, _ in declared):
            continue
        sub = _schemas_of(declared[0][1], value) if isinstance(value, dict) else ()
        out[key] = result_config(value, sub) if sub else value
    return out


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str)
    return out


def flat_config(config: dict) -> dict[str, str]:
    """Dotted key -> the value as JSON (so that lists and nulls compare), the result fields only."""
    return _flatten(result_config(config))
