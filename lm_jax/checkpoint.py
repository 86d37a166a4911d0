"""Thin Orbax CheckpointManager wrapper: params, optimizer state, data-iterator state, config.

Layout of `workdir/checkpoints/<step>/`: items `params`, `train` (opt_state, step, skipped),
`data` (JSON iterator state) and `meta` (JSON: model/train/data configs). The tokenizer is
saved once in `workdir/tokenizer/` (it never changes during a run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lm_jax.configs.base import ModelConfig

ITEMS = ("params", "train", "data", "meta", "manifest")
TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored; the message says which and what to do."""


def _jsonable(cfg) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


class Checkpointer:
    """Periodic (async) saves with max_to_keep, and resume from the newest restorable step."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True, read_only=False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if not read_only:
            sweep_incomplete(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
        train = {"opt_state": state.opt_state, "step": state.step, "skipped": state.skipped}
        if not force and not self.manager.should_save(step):
            return False
        manifest = {"params": leaf_hashes(state.params), "train": leaf_hashes(train)}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train=ocp.args.StandardSave(train),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
                manifest=ocp.args.JsonSave(manifest),
            ),
            force=force,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def restore(self, step: int, abstract_state, shardings) -> tuple[Any, dict, dict]:
        """Restore (state, data_state, meta) at `step` onto `shardings` (any mesh)."""
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            shardings,
        )
        train_target = {
            "opt_state": target.opt_state,
            "step": target.step,
            "skipped": target.skipped,
        }
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params),
                train=ocp.args.StandardRestore(train_target),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
                manifest=ocp.args.JsonRestore(),
            ),
        )
        t = restored["train"]
        verify(restored["manifest"], {"params": restored["params"], "train": t}, step)
        state = type(abstract_state)(
            step=t["step"],
            params=restored["params"],
            opt_state=t["opt_state"],
            skipped=t["skipped"],
        )
        return state, restored["data"], restored["meta"]

    def restore_latest(self, abstract_state, shardings):
        """Newest step that restores; a broken newer step is skipped with a warning."""
        errors = []
        for step in reversed(self.all_steps()):
            try:
                return step, *self.restore(step, abstract_state, shardings)
            except Exception as e:  # noqa: BLE001 - any failure means: try an older step
                logging.warning(
                    "checkpoint step %d in %s cannot be restored (%s: %s); trying an older one",
                    step,
                    self.directory,
                    type(e).__name__,
                    e,
                )
                errors.append((step, e))
        if errors:
            steps = ", ".join(str(s) for s, _ in errors)
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored (steps {steps}); the last "
                f"error was: {errors[-1][1]}. If the model config changed, restore with the "
                "config the checkpoint was saved with, or start a new --workdir."
            ) from errors[-1][1]
        return None


def leaf_hashes(tree) -> dict[str, str] | None:
    """sha256 of every leaf's bytes, by path (None on multi-process runs: not addressable)."""
    if jax.process_count() > 1:
        return None
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(jax.device_get(leaf))
        out[jax.tree_util.keystr(path)] = hashlib.sha256(
            a.tobytes() + str(a.dtype).encode() + str(a.shape).encode()
        ).hexdigest()[:32]
    return out


def verify(manifest: dict | None, restored: dict, step: int) -> None:
    """Raise CheckpointError if a restored leaf's hash differs from the saved manifest."""
    if not manifest:
        return
    for item, tree in restored.items():
        want = manifest.get(item)
        if want is None:
            continue
        got = leaf_hashes(tree)
        if got is None:
            continue
        bad = [k for k in want if got.get(k) != want[k]]
        if bad:
            raise CheckpointError(
                f"checkpoint step {step}: {len(bad)} restored leaves differ from the hashes saved "
                f"with it (first: {item}{bad[0]}); the files are corrupt"
            )


def sweep_incomplete(directory: str) -> list[str]:
    """Move aside leftovers of interrupted saves/prunes (Orbax temp folders, step folders
    without their commit metadata) into `directory/_incomplete/`, so restores never see them."""
    if not os.path.isdir(directory):
        return []
    moved = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isdir(path) or name.startswith("_"):
            continue
        is_tmp = TMP_MARK in name
        is_step = name.isdigit()
        complete = is_step and os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA"))
        if is_tmp or (is_step and not complete):
            dest = os.path.join(directory, "_incomplete", f"{name}.{int(time.time() * 1e3)}")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(path, dest)
            logging.warning("moved incomplete checkpoint folder %s to %s", path, dest)
            moved.append(name)
    return moved


def read_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta dict) of the newest (or given) checkpoint in `workdir`."""
    ckpt = Checkpointer(workdir, read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint found under {ckpt.directory}")
    meta = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return step, meta["meta"]


def load_model(workdir: str, step: int | None = None, mesh=None):
    """(ModelConfig, params, tokenizer) from a training workdir (newest step by default)."""
    from lm_jax.data.tokenizer import load_tokenizer
    from lm_jax.sharding import make_mesh, params_shardings
    from lm_jax.train.state import abstract_params

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise CheckpointError(
            f"{workdir!r} is not an lm_jax training directory (no checkpoints/ inside)"
        )
    step, meta = read_meta(workdir, step)
    cfg = ModelConfig.from_dict(meta["model"])
    mesh = make_mesh("") if mesh is None else mesh
    boxed = abstract_params(cfg)
    shardings = params_shardings(boxed, mesh)
    import flax.linen as nn

    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    ckpt = Checkpointer(workdir, read_only=True)
    restored = ckpt.manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
    )
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
    return cfg, restored["params"], tokenizer


def meta_dict(model_cfg, train_cfg, data_cfg, extra: dict | None = None) -> dict:
    out = {"model": _jsonable(model_cfg), "train": _jsonable(train_cfg)}
    if data_cfg is not None:
        out["data"] = _jsonable(data_cfg)
    out.update(extra or {})
    return json.loads(json.dumps(out, default=str))
