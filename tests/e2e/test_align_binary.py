"""experiments/align.py end to end on a tiny pretrained base: a few DPG steps with the cosine
schedule write metrics and a summary; a constraint that is not a known kind is one clear line."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def run(args, timeout=600):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, shared_data):
    wd = tmp_path_factory.mktemp("align_base")
    text = shared_data / "tinyshakespeare" / "input.txt"
    r = run(
        [sys.executable, str(REPO / "experiments" / "pretrain.py"), "--preset=tiny"]
        + [f"--train.workdir={wd}", "--train.progress_bar=false", "--train.steps=5"]
        + [f"--data.source=tinyshakespeare:{text}", "--train.num_samples=0"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


def align(base, workdir, *extra):
    return [
        sys.executable,
        str(REPO / "experiments" / "align.py"),
        f"--base={base}",
        f"--train.workdir={workdir}",
        "--align.batch_size=8",
        "--align.max_new_tokens=8",
        "--align.moment_samples=64",
        "--align.eval_samples=16",
        *extra,
    ]


def test_dpg_steps_with_cosine_schedule_write_summary(tiny_base, tmp_path):
    args = ["--constraint=word:e", "--method=dpg", "--train.steps=3", "--train.eval_every=3"]
    schedule = ["--train.lr_schedule=cosine", "--train.min_lr_ratio=0.1"]
    r = run(align(tiny_base, tmp_path, *args, *schedule))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    final = summary["methods"]["dpg"]
    assert final["step"] == 3 and 0.0 <= final["eval/phi_pi"][0] <= 1.0
    assert (tmp_path / "dpg" / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--constraint=colour:blue"], "colour"),
        (
            ["--constraint=word:e", "--train.lr_schedule=cosine", "--train.min_lr_ratio=-1"],
            "min_lr_ratio",
        ),
        (["--constraint=word:e", "--align.moment_feedback=0.1"], "moment_feedback"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_base, tmp_path, flags, names):
    r = run(align(tiny_base, tmp_path, *flags, "--train.steps=1"))
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and names in last
