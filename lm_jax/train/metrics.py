"""Metric sinks: stdout line, JSONL file and TensorBoard scalar events (`event_file.py`)."""

from __future__ import annotations

import json
import os

import numpy as np

from lm_jax.train.event_file import ScalarEventWriter


def _scalar(v):
    a = np.asarray(v)
    return float(a) if a.ndim == 0 else a.astype(float).tolist()


class MetricWriter:
    """Writes `{step, **metrics}` to `workdir/metrics.jsonl` and TensorBoard events."""

    def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        if tensorboard:
            self._tb = ScalarEventWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "") -> dict:
        row = {f"{prefix}{k}": _scalar(v) for k, v in metrics.items()}
        if not self.enabled:
            return row
        self._jsonl.write(json.dumps({"step": int(step), **row}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            scalars = {}
            for k, v in row.items():
                if isinstance(v, list):
                    scalars.update({f"{k}/{i}": float(x) for i, x in enumerate(np.ravel(v))})
                else:
                    scalars[k] = v
            self._tb.add_scalars(int(step), scalars)
        return row

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def format_metrics(step: int, row: dict) -> str:
    parts = [f"step {step}"]
    for k, v in row.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
    return " | ".join(parts)
