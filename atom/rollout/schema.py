"""Hydra schemas derived from the typed objects they configure, so that a field added to
`SamplingParams` or `EngineConfig` reaches the rollout job (and its type checks) by itself."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Dict, List, Optional


def _hydra_type(tp: Any) -> Any:
    """The annotation in a form OmegaConf understands (typing.Optional/List/Dict, no `X | None`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return Optional[_hydra_type(rest[0])]
        return Any  # a union of several types: OmegaConf cannot check it; the target class does
    if origin in (list, List, tuple):
        return List[_hydra_type(args[0])] if args else List[Any]
    if origin in (dict, Dict):
        return Dict[_hydra_type(args[0]), _hydra_type(args[1])] if args else Dict[Any, Any]
    if tp in (int, float, str, bool):
        return tp
    return Any


def derive_schema(source: type, name: str, doc: str, *, exclude: tuple[str, ...] = (),
                  defaults: dict[str, Any] | None = None) -> type:
    """A dataclass with `source`'s fields (types made Hydra-friendly, `defaults` overriding its
    defaults), minus `exclude`."""
    hints = typing.get_type_hints(source)
    defaults = defaults or {}
    unknown = set(defaults) - {f.name for f in dataclasses.fields(source)}
    if unknown:
        raise ValueError(f"derive_schema({name}): {sorted(unknown)} are not fields of {source.__name__}")
    fields = []
    for f in dataclasses.fields(source):
        if f.name in exclude or not f.init:
            continue
        if f.name in defaults:
            value = defaults[f.name]
            spec = dataclasses.field(default_factory=lambda v=value: v) if isinstance(value, (list, dict)) \
                else dataclasses.field(default=value)
        elif f.default is not dataclasses.MISSING:
            spec = dataclasses.field(default=f.default)
        else:
            spec = dataclasses.field(default_factory=f.default_factory)
        fields.append((f.name, _hydra_type(hints[f.name]), spec))
    cls = dataclasses.make_dataclass(name, fields)
    cls.__doc__ = doc
    cls.__module__ = "atom.rollout.job_config"
    return cls
