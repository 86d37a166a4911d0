"""experiments/pretrain.py end to end: train, checkpoint, resume after kill -9, bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BINARY = REPO / "experiments" / "pretrain.py"


def corpus(shared_data) -> str:
    return f"tinyshakespeare:{shared_data / 'tinyshakespeare' / 'input.txt'}"


def cmd(workdir, *extra, preset="tiny"):
    return [
        sys.executable,
        str(BINARY),
        f"--preset={preset}",
        f"--train.workdir={workdir}",
        "--train.progress_bar=false",
        *extra,
    ]


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return e


def run(args, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env())


def test_tiny_run_trains_saves_evaluates_and_samples(tmp_path, shared_data):
    r = run(cmd(tmp_path, f"--data.source={corpus(shared_data)}", "--train.steps=30"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "validation loss" in r.stdout and "bits per byte" in r.stdout
    assert (tmp_path / "checkpoints" / "30").is_dir()
    assert (tmp_path / "tokenizer").is_dir()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0]
    # rerunning the finished command resumes at the end and only evaluates
    r2 = run(cmd(tmp_path, f"--data.source={corpus(shared_data)}", "--train.steps=30"))
    assert r2.returncode == 0 and "resumed from step 30" in r2.stdout


def _steps(path):
    out = {}
    for line in pathlib.Path(path).read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec  # a step re-run after a crash: the last record counts
    return out


@pytest.mark.slow
def test_kill_9_and_resume_is_bitwise_identical(tmp_path, shared_data):
    common = [
        f"--data.source={corpus(shared_data)}",
        "--train.steps=40",
        "--train.save_every=1",
        "--train.log_step_details=true",
        "--train.keep_checkpoints=2",
        "--train.async_checkpointing=false",
        "--train.log_every=1",
    ]
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    r = run(cmd(ref_dir, *common))
    assert r.returncode == 0, r.stderr[-3000:]

    p = subprocess.Popen(
        cmd(crash_dir, *common), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env()
    )
    log = crash_dir / "steps.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if log.exists() and any(json.loads(x)["step"] >= 17 for x in log.read_text().splitlines()):
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert 17 <= max(_steps(log)) < 40
    r = run(cmd(crash_dir, *common))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step" in r.stdout

    ref, got = _steps(ref_dir / "steps.jsonl"), _steps(log)
    assert sorted(got) == list(range(1, 41))
    for s in range(1, 41):
        assert got[s]["loss_hex"] == ref[s]["loss_hex"], s
        assert got[s]["example_ids"] == ref[s]["example_ids"], s
    assert got[40]["params_hash"] == ref[40]["params_hash"]


BAD_INPUTS = [
    (["--train.stepz=3"], "stepz"),
    (["--train.steps=abc"], "steps"),
    (["--train.mesh=data:3"], "needs 3 devices but 2"),
    (["--data.source=file:/nonexistent/corpus*.txt"], "nonexistent"),
    (["--model.vocab_size=10"], "vocab"),
]


@pytest.mark.parametrize("extra,pattern", BAD_INPUTS)
def test_bad_input_fails_fast_with_a_clear_message(tmp_path, extra, pattern):
    t = time.time()
    r = run(cmd(tmp_path / "w", *extra), timeout=120)
    assert r.returncode != 0
    assert pattern.lower() in r.stderr.lower(), r.stderr[-2000:]
    assert time.time() - t < 60
    assert not (tmp_path / "w" / "checkpoints").exists() or not any(
        (tmp_path / "w" / "checkpoints").iterdir()
    )


def test_empty_corpus_and_corrupt_tokenizer(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = run(cmd(tmp_path / "a", f"--data.source=file:{empty}"), timeout=120)
    assert r.returncode != 0 and "empty" in r.stderr.lower(), r.stderr[-2000:]
    tok = tmp_path / "b" / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "lm_jax_tokenizer.json").write_text("{not json")
    r = run(cmd(tmp_path / "b"), timeout=120)
    assert r.returncode != 0 and "tokenizer" in r.stderr.lower(), r.stderr[-2000:]
