"""Parts of parameter trees: what a checkpoint saves of a state (`state_parts`), the trainable
leaves only (`prune` by a boolean mask, e.g. LoRA adapters), and putting them back into a base
tree (`graft`). Pure functions over nested dicts."""

from __future__ import annotations

import dataclasses
from typing import Any


def state_parts(state) -> tuple[Any, dict]:
    """(params, {field: value}) of a state dataclass; None fields are left out."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    params = fields.pop("params")
    return params, {k: v for k, v in fields.items() if v is not None}


def prune(tree, mask):
    """The nested dict `tree` cut to the leaves where `mask` (same structure) is True;
    subtrees left empty are dropped. `mask=None` keeps everything."""
    if mask is None:
        return tree
    out = _prune(tree, mask)
    return {} if out is _CUT else out


_CUT = object()


def _prune(tree, mask):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            kept = _prune(v, mask[k])
            if kept is not _CUT:
                out[k] = kept
        return out or _CUT
    return tree if bool(mask) else _CUT


def graft(base, part):
    """`base` with the leaves of the (pruned) nested dict `part` put in place."""
    if not isinstance(part, dict):
        return part
    out = dict(base)
    for k, v in part.items():
        out[k] = graft(base[k], v)
    return out
