"""Debug fault injection for the reliability tests (never active unless asked for).

`LM_JAX_FAULTS` (environment) holds comma-separated `name=value` settings; the checkpointer
installs them once per process:

  slow_save=S      the commit of every checkpoint (Orbax's rename of the temporary folder)
                   waits S seconds first, after printing `LM_JAX_FAULT save_commit step=N`
                   to stderr; `Checkpointer.save` also prints `LM_JAX_FAULT save_begin step=N`
                   once the (async) save has started writing. A test kills the process on
                   these lines to land inside a save.
  slow_prune=S     deleting an old step (max_to_keep) first removes the step's files, as
                   Orbax's parallel deleter does, prints `LM_JAX_FAULT prune step=N`, waits
                   S seconds, then removes the folders: a kill there leaves the empty step
                   folder that an interrupted Orbax prune leaves.
  disk_full_at=N   saving step >= N fails in the background writer with
                   OSError(ENOSPC, "No space left on device") after writing part of a file.

Training itself is never changed: the same flags give the same trajectory with or without
faults (only the timing and the on-disk state at a kill differ).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import re
import sys
import time

from lm_jax.errors import FaultSpecError  # defined there, re-exported here

ENV = "LM_JAX_FAULTS"
MARK = "LM_JAX_FAULT"
_installed = False


KNOWN = ("slow_save", "slow_prune", "disk_full_at")


def settings() -> dict[str, float]:
    """{fault: value} from `LM_JAX_FAULTS`, e.g. "slow_save=2,disk_full_at=15"."""
    out = {}
    for part in os.environ.get(ENV, "").split(","):
        if not part.strip():
            continue
        k, _, v = (x.strip() for x in part.partition("="))
        if k not in KNOWN:
            raise FaultSpecError(f"{ENV}: unknown fault {k!r} in {part!r}; known: {KNOWN}.")
        try:
            out[k] = float(v)
        except ValueError:
            raise FaultSpecError(
                f"{ENV}: {k} needs a number, got {part!r} (e.g. {k}=2); unset {ENV} to train "
                "without faults."
            ) from None
    return out


def mark(event: str, step: int) -> None:
    print(f"{MARK} {event} step={step}", file=sys.stderr, flush=True)


def _step_of(path) -> int:
    m = re.match(r"(\d+)", os.path.basename(str(path)))
    return int(m.group(1)) if m else -1


def install() -> dict[str, float]:
    """Patch Orbax as `LM_JAX_FAULTS` asks (idempotent); returns the settings."""
    global _installed
    cfg = settings()
    if not cfg or _installed:
        return cfg
    _installed = True
    if "slow_save" in cfg:
        from orbax.checkpoint._src.path import atomicity

        cls = atomicity.AtomicRenameTemporaryPath
        orig = cls.finalize

        @functools.wraps(orig)
        async def finalize(self, *a, **kw):
            step = _step_of(self.get_final())
            if step >= 0:  # the step folder (items inside it are finalized first)
                mark("save_commit", step)
                await asyncio.sleep(cfg["slow_save"])
            return await orig(self, *a, **kw)

        cls.finalize = finalize
    if "slow_prune" in cfg:
        from orbax.checkpoint._src.path import deleter

        cls = deleter.StandardCheckpointDeleter
        orig_delete = cls.delete

        @functools.wraps(orig_delete)
        def delete(self, step, *a, **kw):
            path = os.path.join(str(self._directory), str(step))
            for root, _, files in os.walk(path):
                for f in files:
                    os.remove(os.path.join(root, f))
            mark("prune", step)
            time.sleep(cfg["slow_prune"])
            return orig_delete(self, step, *a, **kw)

        cls.delete = delete
    if "disk_full_at" in cfg:
        from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

        cls = jh.JsonCheckpointHandler
        orig_save = cls._save_fn

        async def _save_fn(self, x, directory):
            if _step_of(os.path.dirname(str(directory))) >= cfg["disk_full_at"]:
                with open(os.path.join(str(directory), "partial"), "wb") as f:
                    f.write(b"\0" * 4096)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
            return await orig_save(self, x, directory)

        cls._save_fn = _save_fn
    return cfg
