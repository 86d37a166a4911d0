"""Thin Orbax CheckpointManager wrapper: params, optimizer state, data-iterator state, config.

Layout of `workdir/checkpoints/<step>/`: items `params`, `train` (opt_state, step, skipped),
`data` (JSON iterator state) and `meta` (JSON: model/train/data configs). The tokenizer is
saved once in `workdir/tokenizer/` (it never changes during a run).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from lm_jax import faults
from lm_jax.configs.base import ModelConfig
from lm_jax.data.tokenizer import load_tokenizer
from lm_jax.errors import CheckpointError, CheckpointMismatch, CheckpointWriteError, ConfigError
from lm_jax.nn.transformer import abstract_params
from lm_jax.resume_config import (  # noqa: F401 - re-exported
    RESUMABLE_MODEL_FIELDS,
    STREAM_DATA_FIELDS,
    check_resume_config,
    config_changes,
)
from lm_jax.sharding import make_mesh, params_shardings
from lm_jax.tree_parts import graft, prune, state_parts

ITEMS = ("params", "train", "data", "meta", "manifest")
TMP_MARK = ".orbax-checkpoint-tmp"


def _jsonable(cfg) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


class Checkpointer:
    """Periodic (async) saves with max_to_keep, and resume from the newest restorable step."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True, read_only=False):
        self._faults = faults.install()
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if not read_only:
            check_writable(self.directory)
            sweep_incomplete(self.directory)
        self._pending: int | None = None  # step of a save that may still be in flight
        self._save_error: BaseException | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        # Orbax logs a failed async write and goes on (orbax #605); keep the error to raise it.
        orig_check = self.manager.check_for_errors

        def check_for_errors():
            try:
                orig_check()
            except BaseException as e:
                self._save_error = e
                raise

        self.manager.check_for_errors = check_for_errors

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self, step: int, state, data_state: dict, meta: dict, force: bool = False, params_mask=None
    ) -> bool:
        """Save `state` (a dataclass with `params`; every other non-None field goes to the
        `train` item). `params_mask` (tree of bools): save only those parameter leaves (the
        frozen rest is reloaded from its source on restore, e.g. a LoRA base)."""
        params, train = state_parts(state)
        params = prune(params, params_mask)
        if not force and not self.manager.should_save(step):
            return False
        self.wait()  # raises if the previous (async) save failed, before anything is pruned
        manifest = {
            "params": leaf_hashes(params, check_finite=f"step {step} params"),
            "train": leaf_hashes(train, check_finite=f"step {step} optimizer state"),
        }
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                train=ocp.args.StandardSave(train),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
                manifest=ocp.args.JsonSave(manifest),
            ),
            force=force,
        )
        if saved:
            self._pending = step
            if self._faults:
                faults.mark("save_begin", step)
        return saved

    def wait(self) -> None:
        """Block until the in-flight save is committed; CheckpointWriteError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - reported below with the step
            self._save_error = self._save_error or e
        step, self._pending = self._pending, None
        if step is None and self._save_error is None:
            return
        committed = step is None or os.path.isfile(
            os.path.join(self.directory, str(step), "_CHECKPOINT_METADATA")
        )
        if committed and self._save_error is None:
            return
        e, self._save_error = self._save_error, None
        cause = f"{type(e).__name__}: {e}" if e is not None else "the step folder is missing"
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise CheckpointWriteError(
            f"saving checkpoint step {step} in {self.directory} failed"
            + (" - disk full (no space left on device)" if full else "")
            + f" ({cause}). Earlier checkpoints are intact; "
            + ("free disk space" if full else "fix the cause")
            + " and rerun the same command to resume from the newest one."
        ) from e

    def close(self) -> None:
        self.manager.close()

    def restore(
        self, step: int, abstract_state, shardings, params_mask=None, base_params=None
    ) -> tuple[Any, dict, dict]:
        """Restore (state, data_state, meta) at `step` onto `shardings` (any mesh).
        With `params_mask` (as given to `save`), the saved leaves are grafted into
        `base_params` (the frozen leaves, already placed)."""
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            shardings,
        )
        target_params, train_target = state_parts(target)
        target_params = prune(target_params, params_mask)
        check_shapes(step, prune(abstract_state.params, params_mask), self.directory)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target_params),
                train=ocp.args.StandardRestore(train_target),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
                manifest=ocp.args.JsonRestore(),
            ),
        )
        t = restored["train"]
        verify(restored["manifest"], {"params": restored["params"], "train": t}, step)
        params = restored["params"]
        if params_mask is not None:
            params = graft(base_params, params)
        state = abstract_state.replace(params=params, **t)
        return state, restored["data"], restored["meta"]

    def restore_latest(self, abstract_state, shardings, params_mask=None, base_params=None):
        """Newest step that restores; a broken newer step is skipped with a warning."""
        errors = []
        for step in reversed(self.all_steps()):
            try:
                return step, *self.restore(
                    step, abstract_state, shardings, params_mask, base_params
                )
            except CheckpointMismatch:
                raise
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
                "config the checkpoint was saved with, or start a new --train.workdir."
            ) from errors[-1][1]
        return None


def check_writable(directory: str) -> None:
    """CheckpointError unless `directory` can be created and written to (read-only mounts too)."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_probe.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(
            f"checkpoint folder {directory} is not writable ({e.strerror or e}); make it "
            "writable or choose another --train.workdir"
        ) from None


def check_shapes(step: int, abstract_params, directory: str) -> None:
    """CheckpointMismatch naming the first leaf whose saved shape differs from the model's."""
    try:
        from etils import epath

        meta = ocp.StandardCheckpointHandler().metadata(
            epath.Path(directory) / str(step) / "params"
        )
        saved = {
            jax.tree_util.keystr(p): tuple(m.shape)
            for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]
        }
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself reports it
        return
    if not saved:
        return
    want = {
        jax.tree_util.keystr(p): tuple(a.shape)
        for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }
    fix = (
        "resume with the model config the checkpoint was saved with (see its meta item), "
        "or start a new --train.workdir"
    )
    for k, shape in want.items():
        if k not in saved:
            raise CheckpointMismatch(
                f"checkpoint step {step} in {directory} has no parameter params{k} "
                f"(the model now has one of shape {shape}); {fix}"
            )
        if saved[k] != shape:
            raise CheckpointMismatch(
                f"checkpoint step {step} in {directory}: parameter params{k} has shape "
                f"{saved[k]} but the model config gives {shape}; {fix}"
            )
    extra = sorted(set(saved) - set(want))
    if extra:
        raise CheckpointMismatch(
            f"checkpoint step {step} in {directory} has parameter params{extra[0]} that the "
            f"model does not have; {fix}"
        )




def leaf_hashes(tree, check_finite: str | None = None) -> dict[str, str] | None:
    """sha256 of every leaf's bytes, by path (None on multi-process runs: not addressable).

    `check_finite`: a description of the tree; a NaN/Inf leaf is then a CheckpointError
    (nothing non-finite is ever committed)."""
    if jax.process_count() > 1:
        return None
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(jax.device_get(leaf))
        if check_finite and a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise CheckpointError(
                f"refusing to save {check_finite}: {jax.tree_util.keystr(path)} holds "
                "non-finite values; the last good checkpoint is kept"
            )
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
    """Delete leftovers of interrupted saves/prunes (Orbax temp folders, step folders without
    their commit metadata, e.g. the empty folder a kill during pruning leaves), so restores
    never see them and a failed save's space comes back. Returns the names removed."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        is_tmp = TMP_MARK in name or name == "_incomplete"  # (older lm_jax moved them there)
        is_step = name.isdigit()
        complete = is_step and os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA"))
        if is_tmp or (is_step and not complete):
            shutil.rmtree(path, ignore_errors=True)
            logging.warning("removed incomplete checkpoint folder %s", path)
            removed.append(name)
    return removed


def read_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta dict) of the newest (or given) checkpoint in `workdir`."""
    ckpt = Checkpointer(workdir, read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(
            f"no checkpoint found under {ckpt.directory}; train into that workdir first "
            "or point to one that has checkpoints"
        )
    try:
        meta = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint step {step} under {ckpt.directory} is unreadable "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); delete that step folder "
            "to use an older one, or retrain"
        ) from e
    return step, meta["meta"]


def workdir_kind(path: str) -> str | None:
    """What a folder without checkpoints/ holds: 'lora_adapters' (a LoRA fine-tune),
    'image_text' (experiments/train_image_text.py), 'hf' (a Hugging Face model) or None."""
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, "adapters", "lora_adapter.json")):
        return "lora_adapters"
    names = os.listdir(path)
    if any(n.endswith("_params.msgpack") for n in names):
        return "image_text"
    if "config.json" in names:
        return "hf"
    return None


KIND_NAMES = {
    "lora_adapters": "LoRA adapters (experiments/finetune.py)",
    "image_text": "an image-text run (experiments/train_image_text.py)",
    "hf": "a Hugging Face model",
}


def check_own_workdir(workdir: str, meta_key: str, what: str) -> None:
    """A `--train.workdir` for a run whose checkpoints carry `meta_key` in their meta (e.g.
    "lstm", "tagger"): a file, a folder of another kind, or checkpoints of another kind of run
    fail with a one-line error before anything is written. `what` names the run ("the LSTM run")."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--train.workdir={workdir} is a file, not a folder; give a folder")
    kind = workdir_kind(workdir)
    if kind is not None:
        raise CheckpointError(
            f"--train.workdir={workdir} holds {KIND_NAMES[kind]}; give {what} its own folder"
        )
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        if Checkpointer(workdir, read_only=True).latest_step() is None:
            return  # killed before its first save committed: the run starts afresh
        _, meta = read_meta(workdir)
        if meta_key not in meta:
            raise CheckpointError(
                f"--train.workdir={workdir} holds checkpoints of another kind of run; give "
                f"{what} its own folder"
            )


def not_a_workdir(workdir: str) -> str:
    """Why `workdir` (without checkpoints/) is no decoder training workdir, and what to give."""
    want = "give --checkpoint the --train.workdir of an experiments/pretrain.py run"
    if not os.path.exists(workdir):
        return f"checkpoint {workdir!r} does not exist; {want}"
    if not os.path.isdir(workdir):
        hint = " (a GGUF file: use --gguf)" if workdir.endswith(".gguf") else ""
        return f"checkpoint {workdir!r} is a file, not a training directory{hint}; {want}"
    kind = workdir_kind(workdir)
    if kind == "lora_adapters":
        return (
            f"{workdir!r} holds LoRA adapters (experiments/finetune.py), not a whole model; "
            "load its base model instead, or fine-tune with --nofinetune.lora for a checkpoint"
        )
    if kind == "image_text":
        return (
            f"{workdir!r} is an image-text workdir (experiments/train_image_text.py), not a "
            f"decoder checkpoint; {want}"
        )
    if kind == "hf":
        return f"{workdir!r} looks like a Hugging Face model folder: use --hf_dir"
    return f"{workdir!r} is not an lm_jax training directory (no checkpoints/ inside); {want}"


def load_model(workdir: str, step: int | None = None, mesh=None):
    """(ModelConfig, params, tokenizer) from a training workdir (newest step by default)."""

    if workdir_kind(workdir) is not None or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise CheckpointError(not_a_workdir(workdir))  # a LoRA run has checkpoints/ too
    step, meta = read_meta(workdir, step)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(
            f"checkpoint step {step} under {workdir!r} records no decoder model config: it is "
            "no lm_jax decoder checkpoint; give the --train.workdir of a pretrain run"
        )
    cfg = ModelConfig.from_dict(meta["model"])
    params = restore_params(workdir, step, abstract_params(cfg), mesh)
    return cfg, params, load_tokenizer(os.path.join(workdir, "tokenizer"))


def restore_params(workdir: str, step: int, boxed_params, mesh=None):
    """The params alone of checkpoint `step` in `workdir`, onto the logical shardings of the
    boxed abstract params (any model) on `mesh` (default: all devices on data)."""
    mesh = make_mesh("") if mesh is None else mesh
    shardings = params_shardings(boxed_params, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(boxed_params), shardings,
    )  # fmt: skip
    ckpt = Checkpointer(workdir, read_only=True)
    restored = ckpt.manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
    )
    return restored["params"]


def meta_dict(model_cfg, train_cfg, data_cfg, extra: dict | None = None) -> dict:
    out = {"model": _jsonable(model_cfg), "train": _jsonable(train_cfg)}
    if data_cfg is not None:
        out["data"] = _jsonable(data_cfg)
    out.update(extra or {})
    return json.loads(json.dumps(out, default=str))
