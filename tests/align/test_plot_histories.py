"""`plot_histories` draws one KL(p||a) floor, or one per run when the runs' targets differ."""

import matplotlib

matplotlib.use("Agg")
from matplotlib.axes import Axes  # noqa: E402

from lm_jax.align.loop import plot_histories  # noqa: E402


def _hist(kl):
    return [{"step": s, "eval/phi_pi": [0.1 * s], "eval/kl_pi_a": kl * s} for s in (0, 1, 2)]


def _floors_drawn(monkeypatch, tmp_path, floor):
    drawn = []
    original = Axes.axhline

    def record(self, y=0, *args, **kw):
        drawn.append((round(y, 6), kw.get("label")))
        return original(self, y, *args, **kw)

    monkeypatch.setattr(Axes, "axhline", record)
    out = tmp_path / "p.png"
    plot_histories({"a": _hist(0.3), "b": _hist(0.2)}, floor, str(out))
    assert out.stat().st_size > 1000
    return drawn


def test_one_shared_floor(monkeypatch, tmp_path):
    assert _floors_drawn(monkeypatch, tmp_path, 0.5) == [(0.5, "KL(p||a)")]
    assert _floors_drawn(monkeypatch, tmp_path, {"a": 0.5, "b": 0.5}) == [(0.5, "KL(p||a)")]


def test_one_floor_per_run_when_targets_differ(monkeypatch, tmp_path):
    drawn = _floors_drawn(monkeypatch, tmp_path, {"a": 0.5, "b": 0.8})
    assert drawn == [(0.5, "KL(p||a), a"), (0.8, "KL(p||a), b")]
