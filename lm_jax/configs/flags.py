"""absl flags generated from the config dataclasses: `--model.d_model=128`, `--train.steps=10`,
`--data.source=file:corpus/*.txt`, `--model.moe.num_experts=8`. A flag left unset keeps the preset's
value; unknown or malformed flags are absl errors that name the flag. An optional nested config
also gets a bool flag: `--nomodel.moe` removes it, `--model.moe` creates it with defaults (setting
any `--model.moe.x` creates it too). Tuples of strings are comma-separated lists."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from absl import flags

from lm_jax.errors import ConfigError

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


def _is_str_tuple(tp) -> bool:
    return typing.get_origin(tp) is tuple and typing.get_args(tp) in ((str, ...), (str,))


def define_config_flags(prefix: str, cls, flag_values=flags.FLAGS, fields=None) -> list[str]:
    """Define one flag per scalar field of dataclass `cls` (recursing into nested configs);
    `fields`: only these top-level fields (a binary that uses part of a config)."""
    names = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if fields is not None and f.name not in fields:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        name = f"{prefix}.{f.name}"
        doc = f"{cls.__name__}.{f.name} (unset: keep the preset's value)"
        if dataclasses.is_dataclass(tp):
            if optional:
                flags.DEFINE_bool(
                    name,
                    None,
                    f"{cls.__name__}.{f.name}: false = None, true = {tp.__name__} (defaults "
                    f"or the preset's); --{name}.x flags set its fields",
                    flag_values=flag_values,
                )
                names.append(name)
            names += define_config_flags(name, tp, flag_values)
        elif _is_str_tuple(tp):
            flags.DEFINE_list(name, None, doc + "; comma-separated", flag_values=flag_values)
            names.append(name)
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
            nested = [n for n in flag_values if n.startswith(name + ".") and flag_values[n].present]
            switch = flag_values[name] if name in flag_values else None
            if switch is not None and switch.present and not switch.value:
                if nested:
                    raise ConfigError(f"--no{name} removes {name}: drop --{nested[0]} too.")
                updates[f.name] = None
            elif nested or (switch is not None and switch.present):
                current = getattr(cfg, f.name)
                updates[f.name] = apply_config_flags(name, current or tp(), flag_values)
        elif name in flag_values and flag_values[name].present:
            value = flag_values[name].value
            updates[f.name] = tuple(value) if _is_str_tuple(tp) else value
    return dataclasses.replace(cfg, **updates) if updates else cfg
