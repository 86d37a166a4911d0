"""absl flags generated from the config dataclasses: `--model.d_model=128`, `--train.steps=10`,
`--data.source=file:corpus/*.txt`, `--model.moe.num_experts=8`. A flag left unset keeps the preset's
value; unknown or malformed flags are absl errors that name the flag."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from absl import flags

_SIMPLE = {
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
    bool: flags.DEFINE_bool,
}


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _hints(cls) -> dict:
    """Type hints of dataclass `cls` (string annotations resolved in its module)."""
    return typing.get_type_hints(cls)


def define_config_flags(prefix: str, cls, flag_values=flags.FLAGS) -> list[str]:
    """Define one flag per scalar field of dataclass `cls` (recursing into nested configs)."""
    names = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        name = f"{prefix}.{f.name}"
        doc = f"{cls.__name__}.{f.name} (unset: keep the preset's value)"
        if dataclasses.is_dataclass(tp):
            names += define_config_flags(name, tp, flag_values)
        elif typing.get_origin(tp) is Literal:
            flags.DEFINE_enum(
                name, None, [str(a) for a in typing.get_args(tp)], doc, flag_values=flag_values
            )
            names.append(name)
        elif tp in _SIMPLE:
            _SIMPLE[tp](name, None, doc, flag_values=flag_values)
            names.append(name)
    return names


def apply_config_flags(prefix: str, cfg: Any, flag_values=flags.FLAGS) -> Any:
    """Return `cfg` with every set `--prefix.field` flag applied (nested configs created)."""
    hints = _hints(type(cfg))
    updates = {}
    for f in dataclasses.fields(cfg):
        name = f"{prefix}.{f.name}"
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            nested_set = any(
                n.startswith(name + ".") and flag_values[n].present for n in flag_values
            )
            if nested_set:
                current = getattr(cfg, f.name)
                updates[f.name] = apply_config_flags(name, current or tp(), flag_values)
        elif name in flag_values and flag_values[name].present:
            updates[f.name] = flag_values[name].value
    return dataclasses.replace(cfg, **updates) if updates else cfg
