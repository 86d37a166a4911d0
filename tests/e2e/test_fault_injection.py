"""Fault injection on experiments/pretrain.py (issue 8): F0 determinism, F1 kill -9 inside saves
and pruning, F2 SIGTERM, F3 mesh change and mismatched restores, F5 bad input with the checkpoint
folder unchanged, F6 non-finite policy, F7 disk full.

Faults come from `LM_JAX_FAULTS` (lm_jax/faults.py): slowed save commits and prunes that print a
marker line on stderr, so a kill lands inside the phase, and an injected ENOSPC. Every run uses a
persistent XLA compilation cache so the many restarts cost little compile time; the trajectory is
the same with or without it. Each run is a forked child of a warm interpreter (warm_binaries.py),
so a restart costs no imports either; kill -9 of the child is a real crash.
`-s` prints the measured figures (benchmarks/RESULTS.md).
"""

import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from test_pretrain_binary import _steps, cmd, env
from warm_binaries import WarmBinaries

SAVE_EVERY = 5
STEPS = 60
B, T = 8, 64  # the tiny preset's batch and sequence length
ROWS_PER_EPOCH = 96  # the corpus below is cut to exactly this many rows (12 steps an epoch)
FIGURES: dict = {}


def report(name, **kw):
    FIGURES[name] = kw
    print(f"\n[fault-injection] {name}: {json.dumps(kw)}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The suite's compilation cache (conftest.py), else one for this module."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or tmp_path_factory.mktemp("xla_cache")


def fenv(cache_dir, faults=""):
    e = env()
    e["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    if faults:
        e["LM_JAX_FAULTS"] = faults
    else:
        e.pop("LM_JAX_FAULTS", None)
    return e


def _paragraph_corpus(path: pathlib.Path, n_rows: int) -> None:
    """Paragraph documents (one example id each) whose train split packs into exactly
    `n_rows` rows of T tokens, so epochs end on a batch boundary."""
    from lm_jax.data import DataConfig
    from lm_jax.data.factory import build_tokenizer_for
    from lm_jax.data.pipeline import token_stream

    rng = random.Random(0)
    words = "the of and to a in is it you that he was for on are as with his they at be".split()
    paras = [
        f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(15, 35))) + "."
        for i in range(60)
    ]
    for _ in range(50):  # grow or trim the first paragraph (far from the validation cut)
        path.write_text("\n\n".join(paras) + "\n")
        cfg = DataConfig(source=f"paragraphs:{path}", tokenizer="char", seq_len=T, batch_size=B)
        n = token_stream(cfg, build_tokenizer_for(cfg), "train").size
        if n == n_rows * T:
            return
        delta = n_rows * T - n
        paras[0] = paras[0] + "x" * delta if delta > 0 else paras[0][:delta]
    raise AssertionError("could not tune the corpus")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    _paragraph_corpus(path, ROWS_PER_EPOCH)
    return f"paragraphs:{path}"


def common(corpus, steps=STEPS, *extra):
    return [
        f"--data.source={corpus}",
        f"--train.steps={steps}",
        f"--train.save_every={SAVE_EVERY}",
        "--train.keep_checkpoints=2",
        "--train.async_checkpointing=true",
        "--train.log_step_details=true",
        "--train.num_samples=0",
        "--train.eval_batches=1",
        *extra,
    ]


def run_binary(workdir, args, cache_dir, faults="", timeout=300):
    """`python experiments/pretrain.py ...` to the end, in a forked child of a warm interpreter
    (warm_binaries.py: the same process from the binary's first line, without 3-5 s of imports;
    kill -9 of it is a real crash). test_pretrain_binary.py keeps a cold-process kill -9 case."""
    server = WarmBinaries.for_env(fenv(cache_dir))
    return server.run(cmd(workdir, *args), timeout=timeout, env=fenv(cache_dir, faults))


def run_ok(workdir, args, cache_dir, faults="", timeout=300):
    r = run_binary(workdir, args, cache_dir, faults, timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir):
    """The uninterrupted 60-step run every crash/resume run must reproduce to the bit."""
    wd = tmp_path_factory.mktemp("reference")
    run_ok(wd, common(corpus), cache_dir)
    return wd


# ---------------------------------------------------------------- helpers for kill loops


def checkpoint_debris(workdir) -> list[str]:
    """Temporary folders and step folders without commit metadata (what a kill leaves)."""
    d = pathlib.Path(workdir) / "checkpoints"
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if not p.is_dir():
            continue
        if "tmp" in p.name or p.name.startswith("_"):
            out.append(p.name)
        elif p.name.isdigit() and not (p / "_CHECKPOINT_METADATA").is_file():
            out.append(p.name)
    return sorted(out)


def committed_steps(workdir) -> list[int]:
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(
        int(p.name)
        for p in d.iterdir()
        if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file()
    )


def new_steps(log: pathlib.Path, offset: int) -> list[int]:
    if not log.exists():
        return []
    text = log.read_text()[offset:]
    return [json.loads(x)["step"] for x in text.splitlines() if x.strip().endswith("}")]


class Attempt:
    """One process of a crash/resume sequence: stdout/stderr to files, killed on a marker."""

    def __init__(self, workdir, args, cache_dir, faults, idx):
        self.out = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.{idx}.out"
        self.err = self.out.with_suffix(".err")
        self.log = pathlib.Path(workdir) / "steps.jsonl"
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        self.p = WarmBinaries.for_env(fenv(cache_dir)).popen(
            cmd(workdir, *args), self.out, self.err, env=fenv(cache_dir, faults)
        )

    def wait_marker(self, pattern: str, timeout=180) -> bool:
        deadline = time.time() + timeout
        rx = re.compile(pattern)
        while time.time() < deadline:
            if rx.search(self.err.read_text()):
                return True
            if self.p.poll() is not None:
                return False
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.err.read_text()[-2000:]}")

    def kill(self, delay: float) -> list[int]:
        time.sleep(delay)
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait()
        return new_steps(self.log, self.offset)

    def resumed_from(self) -> int | None:
        """The step this process started from (0: no checkpoint yet), once it says so."""
        m = re.search(r"start step (\d+)/", self.out.read_text())
        return int(m.group(1)) if m else None


def crash_and_resume(workdir, args, cache_dir, targets, slow=0.6, seed=0):
    """Kill -9 at each (marker, step) target in turn, restarting after every kill; then run
    to the end. Returns per-kill records and the final attempt's stdout."""
    rng = random.Random(seed)
    faults = f"slow_save={slow},slow_prune={slow}"
    kills, attempts = [], 0
    prev = None
    for kind, step in targets:
        a = Attempt(workdir, args, cache_dir, faults, attempts)
        attempts += 1
        if prev is not None:
            _check_resume(a, prev)
        hit = a.wait_marker(rf"LM_JAX_FAULT {kind} step={step}\b")
        assert hit, f"process ended before {kind} step={step}:\n{a.err.read_text()[-3000:]}"
        logged = a.kill(rng.uniform(0.0, 0.6 * slow))
        prev = {
            "kind": kind,
            "step": step,
            "last_logged": max(logged, default=a.resumed_from() or 0),
            "debris": checkpoint_debris(workdir),
            "committed": committed_steps(workdir),
        }
        kills.append(prev)
    a = Attempt(workdir, args, cache_dir, "", attempts)
    rc = a.p.wait(timeout=300)
    assert rc == 0, a.err.read_text()[-3000:]
    _check_resume(a, prev)
    assert checkpoint_debris(workdir) == []
    return kills, attempts + 1


def _check_resume(a: Attempt, prev: dict) -> None:
    """The attempt after a kill resumed by itself, from a committed step, losing at most one
    save interval plus the in-flight save, and removed what the kill left behind."""
    deadline = time.time() + 180
    while a.resumed_from() is None and time.time() < deadline and a.p.poll() is None:
        time.sleep(0.02)
    resumed = a.resumed_from()
    assert resumed is not None, a.err.read_text()[-3000:]
    assert resumed == max(prev["committed"], default=0)
    prev["resumed"] = resumed
    prev["lost_steps"] = prev["last_logged"] - resumed
    assert prev["lost_steps"] <= 2 * SAVE_EVERY, prev
    err = a.err.read_text()
    for name in prev["debris"]:
        assert "removed incomplete checkpoint folder" in err and name in err, (name, err[-2000:])


def assert_same_trajectory(ref_dir, got_dir, steps) -> int:
    """Every step's loss (hex), example ids and token counts and parameter hash match; the final
    parameters match to the bit. Returns the bytes compared."""
    from lm_jax.checkpoint import load_model

    ref, got = _steps(ref_dir / "steps.jsonl"), _steps(got_dir / "steps.jsonl")
    assert sorted(got) == list(range(1, steps + 1))
    nbytes = 0
    for s in range(1, steps + 1):
        assert got[s] == ref[s], s
        nbytes += len(json.dumps(got[s]))
    _, p_ref, _ = load_model(str(ref_dir))
    _, p_got, _ = load_model(str(got_dir))
    import jax

    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_got), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.tobytes() == b.tobytes()
        nbytes += a.nbytes
    return nbytes


# ---------------------------------------------------------------- F0 determinism


@pytest.mark.slow
def test_f0_same_config_twice_and_with_workers_gives_byte_identical_step_logs(
    tmp_path, corpus, reference, cache_dir
):
    ref = (reference / "steps.jsonl").read_bytes()
    for name, extra in [("again", []), ("workers", ["--data.num_workers=2"])]:
        run_ok(tmp_path / name, common(corpus, STEPS, *extra), cache_dir)
        assert (tmp_path / name / "steps.jsonl").read_bytes() == ref, name
    report("F0", runs=3, steps=STEPS, log_bytes=len(ref))


def test_step_log_covers_every_example_once_per_epoch(reference, corpus):
    from lm_jax.data import DataConfig
    from lm_jax.data.pipeline import token_stream
    from lm_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(reference / "tokenizer"))
    cfg = DataConfig(source=corpus, tokenizer="char", seq_len=T, batch_size=B)
    want = {int(k): int(v) for k, v in token_stream(cfg, tok, "train").doc_tokens.items()}
    log = _steps(reference / "steps.jsonl")
    per_epoch = ROWS_PER_EPOCH // B
    epochs = STEPS // per_epoch
    for e in range(epochs):
        seen: dict[int, int] = {}
        for s in range(e * per_epoch + 1, (e + 1) * per_epoch + 1):
            for i, c in zip(log[s]["example_ids"], log[s]["example_tokens"], strict=True):
                seen[i] = seen.get(i, 0) + c
        assert seen == want, e  # every example's every token exactly once in epoch e
    report("epochs", epochs=epochs, examples=len(want))


# ---------------------------------------------------------------- F1 kill -9 matrix


def f1_targets(full: bool):
    """In the order they happen (a prune follows the save that triggers it). full: a kill in the
    save of every step 5..50 (alternately at its start and in its commit) and in the pruning after
    the saves of 15, 25, .., 55 (10 + 5, the RESULTS figure); otherwise 5 + 3 (CI time)."""
    out = []
    saves = range(SAVE_EVERY, 55, SAVE_EVERY if full else 2 * SAVE_EVERY)
    for i, s in enumerate(saves):
        out.append(("save_begin" if i % 2 == 0 else "save_commit", s))
        if s in ((15, 25, 35, 45) if full else (15, 35)):
            out.append(("prune", s - 2 * SAVE_EVERY))
    return [*out, ("prune", 55 - 2 * SAVE_EVERY)]


@pytest.mark.slow
def test_f1_kill_9_inside_saves_and_pruning_resumes_bitwise(tmp_path, corpus, reference, cache_dir):
    t0 = time.time()
    wd = tmp_path / "crash"
    full = os.environ.get("LM_JAX_FAULT_MATRIX") == "full"
    targets = f1_targets(full)
    kills, attempts = crash_and_resume(wd, common(corpus), cache_dir, targets)
    nbytes = assert_same_trajectory(reference, wd, STEPS)
    n_save = sum(k["kind"] != "prune" for k in kills)
    n_prune = sum(k["kind"] == "prune" for k in kills)
    assert (n_save, n_prune) == ((10, 5) if full else (5, 3))
    assert sum(bool(k["debris"]) for k in kills if k["kind"] == "prune") == n_prune
    report(
        "F1",
        kills=len(kills),
        in_save=n_save,
        in_prune=n_prune,
        resumes=attempts - 1,
        debris_left_by_kills=sum(len(k["debris"]) for k in kills),
        max_lost_steps=max(k["lost_steps"] for k in kills),
        bytes_compared=nbytes,
        seconds=round(time.time() - t0, 1),
    )


VARIANTS = {
    "moe": ["--model.moe.num_experts=4", "--model.moe.top_k=2"],
    "lora": ["--model.lora.rank=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_f0_f1_moe_and_lora_are_deterministic_and_resume_bitwise(
    tmp_path, corpus, cache_dir, variant
):
    steps = 15
    args = common(corpus, steps, *VARIANTS[variant])
    run_ok(tmp_path / "ref", args, cache_dir)
    target = {"moe": ("save_commit", 10), "lora": ("prune", 5)}[variant]  # one kill each
    kills, attempts = crash_and_resume(tmp_path / "crash", args, cache_dir, [target], seed=1)
    nbytes = assert_same_trajectory(tmp_path / "ref", tmp_path / "crash", steps)
    report(variant, kills=len(kills), resumes=attempts - 1, bytes_compared=nbytes)


# ---------------------------------------------------------------- F2 SIGTERM


@pytest.mark.slow
def test_f2_sigterm_commits_a_checkpoint_exits_0_and_resumes_identically(
    tmp_path, corpus, reference, cache_dir
):
    wd = tmp_path / "pre"
    a = Attempt(wd, common(corpus), cache_dir, "slow_save=0.3", 0)  # slower: a mid-run moment
    while not new_steps(a.log, 0) or max(new_steps(a.log, 0)) < 12:
        assert a.p.poll() is None, a.err.read_text()[-3000:]
        time.sleep(0.01)
    signalled_at = max(new_steps(a.log, 0))
    a.p.send_signal(signal.SIGTERM)
    assert a.p.wait(timeout=120) == 0, a.err.read_text()[-3000:]
    m = re.search(r"SIGTERM: saved step (\d+)", a.out.read_text())
    assert m, a.out.read_text()[-2000:]
    saved = int(m.group(1))
    assert saved >= signalled_at and saved < STEPS
    assert saved in committed_steps(wd) and checkpoint_debris(wd) == []
    r = run_ok(wd, common(corpus), cache_dir)
    assert f"resumed from step {saved}" in r.stdout
    nbytes = assert_same_trajectory(reference, wd, STEPS)
    report("F2", signalled_at=signalled_at, saved=saved, bytes_compared=nbytes)


# ---------------------------------------------------------------- F3 mesh change, mismatch


def _small_model():
    from lm_jax.configs import llama_style

    return llama_style(
        vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=32
    )


def test_f3_save_on_1x8_restores_bitwise_on_2x4_8x1_4x2_and_one_device(tmp_path):
    import jax

    from lm_jax.checkpoint import Checkpointer
    from lm_jax.configs.train import TrainConfig
    from lm_jax.optim import make_optimizer
    from lm_jax.sharding import make_mesh
    from lm_jax.train.state import init_train_state, state_shardings

    model, tx = _small_model(), make_optimizer(TrainConfig())
    state, _ = init_train_state(model, tx, make_mesh("data:1,fsdp:8"), seed=1)
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(3, state, {"pos": 3}, {"model": {}}, force=True)
    ckpt.wait()
    ref = jax.device_get(state)
    nbytes = 0
    for spec, devs in [
        ("data:2,fsdp:4", None),
        ("data:8,fsdp:1", None),
        ("data:4,tensor:2", None),
        ("", jax.devices()[:1]),
    ]:
        mesh = make_mesh(spec, devices=devs)
        abstract, sh = state_shardings(model, tx, mesh)
        step, got, _, _ = Checkpointer(str(tmp_path)).restore_latest(abstract, sh)
        assert step == 3
        assert got.params["layers"]["mlp"]["up_proj"]["kernel"].sharding.mesh.shape == mesh.shape
        for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(ref), strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
            nbytes += np.asarray(a).nbytes
    report("F3", meshes=4, bytes_compared=nbytes)


def test_f3_restore_into_changed_model_is_a_one_line_error_naming_the_leaf(tmp_path):
    from lm_jax.checkpoint import Checkpointer, CheckpointMismatch
    from lm_jax.configs.train import TrainConfig
    from lm_jax.optim import make_optimizer
    from lm_jax.sharding import make_mesh
    from lm_jax.train.state import init_train_state, state_shardings

    model, tx = _small_model(), make_optimizer(TrainConfig())
    mesh = make_mesh("data:8")
    state, _ = init_train_state(model, tx, mesh)
    ckpt = Checkpointer(str(tmp_path), keep=3)
    for s in (1, 2):
        ckpt.save(s, state, {}, {"model": {}}, force=True)
    ckpt.wait()
    abstract, sh = state_shardings(model.replace(mlp_dim=96), tx, mesh)
    with pytest.raises(CheckpointMismatch) as e:
        Checkpointer(str(tmp_path)).restore_latest(abstract, sh)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.search(
        r"params\['layers'\]\['mlp'\]\['\w+'\]\['kernel'\] has shape \(2, (32, 64|64, 32)\) "
        r"but the model config gives \(2, (32, 96|96, 32)\)",
        msg,
    ), msg
    assert "--train.workdir" in msg
    assert committed_steps(tmp_path) == [1, 2]  # nothing deleted, nothing renamed


# ---------------------------------------------------------------- F4 corrupted checkpoints
# (flipped bytes, truncation, an empty step folder and a temp folder in the latest step:
# tests/train/test_sharded_training.py::test_damaged_latest_checkpoint_falls_back_to_intact_step)


def _two_steps(tmp_path):
    import jax
    import jax.numpy as jnp

    from lm_jax.checkpoint import Checkpointer
    from lm_jax.configs.train import TrainConfig
    from lm_jax.optim import make_optimizer
    from lm_jax.sharding import make_mesh
    from lm_jax.train.state import init_train_state, state_shardings

    model, tx = _small_model(), make_optimizer(TrainConfig())
    mesh = make_mesh("data:8")
    state, _ = init_train_state(model, tx, mesh, seed=2)
    rng = np.random.default_rng(0)  # Adam moments start at 0: make them incompressible too
    opt = jax.tree.map(
        lambda x: (
            jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), x.sharding)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x
        ),
        state.opt_state,
    )
    state = state.replace(opt_state=opt)
    ckpt = Checkpointer(str(tmp_path), keep=3)
    for s in (5, 10):
        ckpt.save(s, state, {"pos": s}, {"model": {}}, force=True)
    ckpt.wait()
    ckpt.close()
    return (*state_shardings(model, tx, mesh), jax.device_get(state))


def _data_files(step_dir):
    """Every OCDBT data file of a checkpoint item (damage them all: a save can leave data files
    that no key points to any more, and damage to one of those changes nothing)."""
    return [p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)]


F4_DAMAGE = {
    "deleted_file": lambda d: [f.unlink() for f in _data_files(d / "params")],
    "missing_step_metadata": lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
    "missing_item_metadata": lambda d: (d / "params" / "_METADATA").unlink(),
    "flipped_bytes_in_optimizer_state": lambda d: [_flip(f) for f in _data_files(d / "train")],
}
# Orbax restores params without their tree _METADATA (the given target names every array);
# the values are then checked against the manifest's hashes, so the step is usable as it is.
RECOVERABLE = {"missing_item_metadata"}


def _flip(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["latest", "older"])
@pytest.mark.parametrize("damage", sorted(F4_DAMAGE))
def test_f4_damaged_step_falls_back_to_the_newest_intact_one_with_a_warning(
    tmp_path, damage, which, caplog
):
    import jax

    from lm_jax.checkpoint import Checkpointer

    abstract, sh, saved = _two_steps(tmp_path)
    bad = 10 if which == "latest" else 5
    F4_DAMAGE[damage](tmp_path / "checkpoints" / str(bad))
    with caplog.at_level("WARNING"):
        step, got, data_state, _ = Checkpointer(str(tmp_path)).restore_latest(abstract, sh)
    latest_ok = which == "older" or damage in RECOVERABLE
    if damage.startswith("flipped") and step == 10:  # the flip hit bytes no value is read from
        latest_ok = True
    assert step == (10 if latest_ok else 5) and data_state == {"pos": step}
    # never a silent wrong load: whatever was restored is what was saved, to the bit
    for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(saved), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    if not latest_ok:
        assert re.search(rf"(step {bad} .*cannot be restored|/{bad}\b)", caplog.text), caplog.text
    assert checkpoint_debris(tmp_path) == []


def test_f4_every_step_damaged_is_one_clear_error_not_a_crash_loop(tmp_path):
    from lm_jax.checkpoint import Checkpointer, CheckpointError

    abstract, sh, _ = _two_steps(tmp_path)
    for f in _data_files(tmp_path / "checkpoints" / "5" / "params"):
        f.unlink()
    for f in _data_files(tmp_path / "checkpoints" / "10" / "params"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    for _ in range(2):  # the same answer on every restart; nothing is deleted
        with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be restored"):
            Checkpointer(str(tmp_path)).restore_latest(abstract, sh)
        assert committed_steps(tmp_path) == [5, 10]


# ---------------------------------------------------------------- F5 bad input, folder unchanged


def tree_hash(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A 5-step run whose corpus holds a document far longer than a row (packing continues
    it in the next rows; the run counts it)."""
    base = tmp_path_factory.mktemp("trained")
    text = base / "long.txt"
    text.write_text(
        "\n\n".join(["a short one."] * 20 + ["a long document " * 100] + ["a short one."] * 20)
    )
    wd = base / "w"
    r = run_ok(
        wd,
        [f"--data.source=paragraphs:{text}", "--train.steps=5", "--train.save_every=5"]
        + ["--train.num_samples=0", "--train.eval_batches=1"],
        cache_dir,
    )
    return wd, r.stdout, text


def test_f5_over_long_documents_are_continued_and_counted(trained):
    _, out, _ = trained
    m = re.search(r"data: (\d+) documents.*; (\d+) documents longer than the rest", out)
    assert m, out[-2000:]
    assert int(m.group(1)) >= 20 and int(m.group(2)) >= 1  # the 1600-character one at least


def _edit_manifest(wd, **kw):
    p = wd / "tokenizer" / "lm_jax_tokenizer.json"
    m = json.loads(p.read_text())
    m.update(kw)
    p.write_text(json.dumps(m))


BAD = {
    "pad_id_negative": ([], lambda wd: _edit_manifest(wd, pad_id=-1), r"pad_id -1 is outside"),
    "token_id_ge_vocab": ([], lambda wd: _edit_manifest(wd, eos_id=10_000), r"token id >= vocab"),
    "changed_model_dims": (
        ["--model.d_model=32"],
        None,
        r"params\['.+'\] has shape .* but the model config gives .*--train\.workdir",
    ),
    "changed_activation": (  # same shapes: only the saved config can tell
        ["--model.activation=relu"],
        None,
        r"different model: model\.activation \(saved 'gelu_tanh', now 'relu'\).*--train\.workdir",
    ),
    "changed_data_stream": (
        ["--data.seq_len=32"],
        None,
        r"another row stream: data\.seq_len \(saved 64, now 32\); resuming would repeat",
    ),
    "mesh_vs_devices": (["--train.mesh=data:4"], None, r"needs 4 devices but 2"),
    "experts_vs_expert_axis": (
        ["--model.moe.num_experts=3", "--train.mesh=expert:2"],
        None,
        r"num_experts \(3\) is not divisible by the mesh's expert axis \(2\)",
    ),
    "unknown_flag": (["--train.save_evry=3"], None, r"save_evry"),
    "read_only_checkpoints": ([], "read_only", r"not writable"),
}


def _make_read_only(folder: pathlib.Path) -> bool:
    """A read-only bind mount when we are root (root ignores permissions), else chmod."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return True
    ok = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if ok.returncode != 0:
        return False
    ro = subprocess.run(
        ["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True
    ).returncode
    if ro != 0:
        subprocess.run(["umount", str(folder)])
        return False
    return True


def _undo_read_only(folder: pathlib.Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["umount", str(folder)], capture_output=True)
    else:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


@pytest.mark.parametrize("case", sorted(BAD))
def test_f5_bad_input_fails_fast_and_leaves_the_checkpoints_unchanged(
    tmp_path, trained, cache_dir, case
):
    src, _, text = trained
    extra, prepare, pattern = BAD[case]
    wd = tmp_path / "w"
    shutil.copytree(src, wd)
    ro = False
    if prepare == "read_only":
        if not _make_read_only(wd / "checkpoints"):
            pytest.skip("cannot make a read-only folder here (root without mount)")
        ro = True
    elif prepare is not None:
        prepare(wd)
    before = tree_hash(wd / "checkpoints")
    try:
        t = time.time()
        r = run_binary(
            wd, [f"--data.source=paragraphs:{text}", "--train.steps=10", *extra], cache_dir,
            timeout=120,
        )  # fmt: skip
        took = time.time() - t
    finally:
        if ro:
            _undo_read_only(wd / "checkpoints")
    assert r.returncode != 0, r.stdout[-2000:]
    assert re.search(pattern, r.stderr), r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert took < 60
    assert tree_hash(wd / "checkpoints") == before
    report(f"F5 {case}", seconds=round(took, 1), exit_code=r.returncode)


def test_token_ids_outside_the_vocabulary_are_a_tokenizer_error(tmp_path):
    from lm_jax.data import DataConfig
    from lm_jax.data.byte_tokenizer import ByteTokenizer
    from lm_jax.data.pipeline import token_stream
    from lm_jax.data.tokenizer import TokenizerError

    class Broken(ByteTokenizer):
        def encode_array(self, text):
            return np.asarray([300] + list(text.encode()), np.int32)  # id 300 >= vocab 257

        def encode(self, text):
            return self.encode_array(text).tolist()

    f = tmp_path / "a.txt"
    f.write_text("hello world\n" * 20)
    cfg = DataConfig(source=f"file:{f}", tokenizer="byte", seq_len=8, batch_size=2)
    with pytest.raises(TokenizerError, match=r"token id 300 \(example id 0\), outside"):
        token_stream(cfg, Broken(), "train")


# ---------------------------------------------------------------- F6 non-finite policy


@pytest.mark.slow
def test_f6_consecutive_bad_steps_halt_and_keep_the_last_good_checkpoint(
    tmp_path, corpus, cache_dir
):
    wd = tmp_path / "nan"
    # bad steps 10, 11, 12 (10 is a save step: nothing is saved there); skip allows 3 in a row
    args = common(corpus, 30) + [
        "--train.nonfinite=skip",
        "--train.max_consecutive_skips=3",
        "--debug_nonfinite_step=9",
        "--debug_nonfinite_count=3",
    ]
    r = run_binary(wd, args, cache_dir)
    assert r.returncode == 3, r.stderr[-3000:]  # halted by the non-finite policy
    assert "non-finite loss/gradient at step 12 (3 in a row" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    log = _steps(wd / "steps.jsonl")
    assert max(log) == 12 and [s for s in log if not log[s]["finite"]] == [10, 11, 12]
    assert log[9]["params_hash"] == log[10]["params_hash"] == log[12]["params_hash"]
    assert committed_steps(wd) == [5] and checkpoint_debris(wd) == []
    from lm_jax.checkpoint import load_model

    _, params, _ = load_model(str(wd))
    from lm_jax.train.loop import params_hash

    assert params_hash(params) == log[5]["params_hash"]
    import jax

    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_f6_a_non_finite_state_is_never_committed(tmp_path):
    import jax
    import jax.numpy as jnp

    from lm_jax.checkpoint import Checkpointer, CheckpointError
    from lm_jax.configs.train import TrainConfig
    from lm_jax.optim import make_optimizer
    from lm_jax.sharding import make_mesh
    from lm_jax.train.state import init_train_state

    model, tx = _small_model(), make_optimizer(TrainConfig())
    state, _ = init_train_state(model, tx, make_mesh("data:8"))
    ckpt = Checkpointer(str(tmp_path), keep=1)
    ckpt.save(1, state, {}, {"model": {}}, force=True)
    ckpt.wait()
    bad = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    with pytest.raises(CheckpointError, match="non-finite values; the last good checkpoint"):
        ckpt.save(2, bad, {}, {"model": {}}, force=True)
    ckpt.wait()
    assert committed_steps(tmp_path) == [1]  # and max_to_keep=1 did not prune it


# ---------------------------------------------------------------- F7 disk full


@pytest.mark.slow
def test_f7_disk_full_fails_within_one_save_interval_and_the_next_start_cleans_up(
    tmp_path, corpus, reference, cache_dir
):
    wd = tmp_path / "full"
    t = time.time()
    r = run_binary(wd, common(corpus), cache_dir, "disk_full_at=15")
    assert r.returncode == 2, r.stderr[-3000:]
    assert re.search(r"saving checkpoint step 15 .* failed - disk full", r.stderr), r.stderr[-3000:]
    log = _steps(wd / "steps.jsonl")
    assert max(log) <= 15 + SAVE_EVERY  # reported at the next save at the latest
    assert committed_steps(wd) in ([5, 10], [10])  # nothing lost but (at most) rotation
    debris = checkpoint_debris(wd)
    assert debris, "the failed save left no temporary folder?"
    r2 = run_ok(wd, common(corpus), cache_dir)
    assert "resumed from step 10" in r2.stdout
    assert "removed incomplete checkpoint folder" in r2.stderr
    assert checkpoint_debris(wd) == []
    assert_same_trajectory(reference, wd, STEPS)
    report("F7", failed_at_step=max(log), debris=debris, seconds=round(time.time() - t, 1))


def test_bad_fault_spec_is_a_clear_error(monkeypatch):
    from lm_jax import faults

    monkeypatch.setenv(faults.ENV, "slow_save=abc")
    with pytest.raises(faults.FaultSpecError, match="slow_save needs a number"):
        faults.settings()
    monkeypatch.setenv(faults.ENV, "slow_sav=1")
    with pytest.raises(faults.FaultSpecError, match="unknown fault 'slow_sav'"):
        faults.settings()
    monkeypatch.setenv(faults.ENV, " slow_save = 2 , disk_full_at=15")
    assert faults.settings() == {"slow_save": 2.0, "disk_full_at": 15.0}
