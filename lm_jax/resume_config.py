"""What a resume may change: the config saved with a checkpoint against this run's.

A change of a model field that changes the function (another activation, width...) or of a field
that defines the data row stream is refused (`CheckpointMismatch`, naming the field, both values
and the fix); train-config and execution-only model fields may change and are listed for the log.
"""

from __future__ import annotations

from typing import Any

from lm_jax.errors import CheckpointMismatch

# Model fields that change how the same function is computed (or only regularise training):
# a resume may change them. Any other model field changes the function the checkpoint learned.
RESUMABLE_MODEL_FIELDS = frozenset(
    {"dtype", "attention_impl", "attention_q_block", "remat", "scan_unroll", "dropout"}
)
# Model fields added after checkpoints were first written, with the value a meta saved before
# them implies (the maths then had no such switch); "a.b" only where the saved meta has "a.*".
_ADDED_OFF = ("qkv_bias", "qk_norm", "norm_unit_offset", "embed_scale", "post_norms")
_ADDED_NONE = (
    "layer_types",
    "rope_local_theta",
    "attn_softcap",
    "final_softcap",
    "query_pre_attn_scalar",
)
ADDED_MODEL_FIELDS = {
    **dict.fromkeys(_ADDED_NONE, None),
    **dict.fromkeys(_ADDED_OFF, False),
    "rope_scaling.rope_type": "llama3",
}
# Data fields that define the row stream the saved iterator state points into.
STREAM_DATA_FIELDS = frozenset(
    {"source", "tokenizer", "seq_len", "seed", "shuffle", "val_fraction", "epoch_offsets"}
)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'moe': {'top_k': 2}} -> {'moe.top_k': 2}; a None sub-config stays one entry."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(
    saved: dict, current: dict, added: dict | None = None
) -> list[tuple[str, Any, Any]]:
    """(field, saved value, current value) for every differing field of two config dicts
    (JSON form, as `meta_dict` writes them); nested configs compare field by field. `added`:
    flat field -> implied value for fields the saved dict predates."""
    a, b = _flat(saved), _flat(current)
    for k, v in (added or {}).items():
        parent = k.rpartition(".")[0]
        if k not in a and (not parent or any(x.startswith(parent + ".") for x in a)):
            a[k] = v
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_config(step: int, directory: str, saved: dict, current: dict) -> list[str]:
    """Compare the meta saved at `step` with this run's (`meta_dict` form).

    Raises CheckpointMismatch when the model would compute a different function (e.g.
    another activation: the shapes agree, so the restore itself would succeed silently) or
    the data stream differs (the saved iterator state would point into other rows). Returns
    one line per allowed change (train config, execution-only model fields) for the log.
    """

    def show(changes):
        return "; ".join(f"{k} (saved {a!r}, now {b!r})" for k, a, b in changes)

    fix = (
        "rerun with the saved values (the checkpoint's meta item lists them) or start a new "
        "--train.workdir"
    )

    def changes(section, added=None):  # nothing to compare for a section not saved
        if section not in saved:
            return []
        return config_changes(saved[section], current.get(section, {}), added)

    model = changes("model", ADDED_MODEL_FIELDS)
    bad = [c for c in model if c[0].split(".")[0] not in RESUMABLE_MODEL_FIELDS]
    if bad:
        raise CheckpointMismatch(
            f"checkpoint step {step} in {directory} was trained with a different model: "
            f"model.{show(bad[:3])}{' and more' if len(bad) > 3 else ''}; {fix}"
        )
    data = changes("data")
    bad = [c for c in data if c[0] in STREAM_DATA_FIELDS]
    if bad:
        raise CheckpointMismatch(
            f"checkpoint step {step} in {directory} saved its data position in another row "
            f"stream: data.{show(bad[:3])}; resuming would repeat or skip examples; {fix}"
        )
    train = changes("train", {"optimizer": "adamw"})  # metas before the field: AdamW
    bad = [c for c in train if c[0] == "optimizer"]
    if bad:
        raise CheckpointMismatch(
            f"checkpoint step {step} in {directory} holds the state of another optimizer: "
            f"train.{show(bad)}; {fix}"
        )
    notes = [f"model.{k}: {a!r} -> {b!r}" for k, a, b in model]
    notes += [f"data.{k}: {a!r} -> {b!r}" for k, a, b in data]
    return notes + [f"train.{k}: {a!r} -> {b!r}" for k, a, b in train]
