"""Metric sinks: stdout line, JSONL file and TensorBoard (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import os

import numpy as np


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
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "") -> dict:
        row = {f"{prefix}{k}": _scalar(v) for k, v in metrics.items()}
        if not self.enabled:
            return row
        self._jsonl.write(json.dumps({"step": int(step), **row}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"{k}/{i}", x, step)
                else:
                    self._tb.add_scalar(k, v, step)
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
