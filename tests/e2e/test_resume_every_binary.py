"""Every training binary runs on the one loop, so every one survives a crash: `kill -9` after a
randomly chosen checkpoint, then the same command again, gives the uninterrupted run's losses,
parameters and batches to the bit (`--log_step_details` rows: loss hex, params hash, example ids
or batch hash); SIGTERM saves, exits 0 and resumes the same way. Covers fine-tuning (LoRA and
full; packed multi-turn chat), preference optimisation (DPO, LoRA; the reference log-probs are
read back from the workdir, not scored again), GRPO (LoRA; the sampler's RNG and the samples
included), alignment (DPG), image-text (contrastive), the LSTM LM and the sequence tagger;
pretraining has its own suite (test_fault_injection.py). Every run is a forked child of one warm
interpreter (warm_binaries.py: the binary from its first line, without the imports); kill -9 of
it is a real crash."""

import json
import os
import pathlib
import random
import re
import signal
import sys
import time

import numpy as np
import pytest
from warm_binaries import WarmBinaries

REPO = pathlib.Path(__file__).resolve().parents[2]
PY = sys.executable


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The suite's compilation cache (conftest.py), else one for this module."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or tmp_path_factory.mktemp("xla_resume")


def env(cache_dir):
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    e["PYTHONUNBUFFERED"] = "1"
    e["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    e.pop("LM_JAX_FAULTS", None)
    return e


def records(path: pathlib.Path) -> dict[int, dict]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip().endswith("}"):
            rec = json.loads(line)
            out[rec["step"]] = rec  # a step re-run after a crash: the last record counts
    return out


def run_ok(args, cache_dir, timeout=600):
    r = WarmBinaries.for_env(env(cache_dir)).run(args, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def interrupted(args, cache_dir, out: pathlib.Path, after_save: int, sig, timeout=600):
    """Start `args`, wait until checkpoint step `after_save` is saved, wait a random moment,
    send `sig`; returns (return code, stdout)."""
    p = WarmBinaries.for_env(env(cache_dir)).popen(args, stdout=out, stderr=out)
    deadline = time.time() + timeout
    pattern = re.compile(rf"saved checkpoint step {after_save}\b")
    while not pattern.search(out.read_text()):
        if p.poll() is not None:
            raise AssertionError(f"finished before saving step {after_save}:\n{out.read_text()}")
        if time.time() > deadline:
            p.kill()
            raise AssertionError(f"no save of step {after_save}:\n{out.read_text()[-2000:]}")
        time.sleep(0.02)
    time.sleep(random.Random(after_save).uniform(0.0, 0.3))
    p.send_signal(sig)
    return p.wait(timeout=120), out.read_text()


def check_identical(ref: pathlib.Path, got: pathlib.Path, steps: int) -> None:
    a, b = records(ref), records(got)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in a:
        assert a[s] == b[s], f"step {s}: {a[s]} != {b[s]}"


def crash_resume_case(argv, workdir, ref_log, steps, save_every, cache_dir, tmp_path):
    """kill -9 after a random save, rerun to the end, and compare with the reference."""
    kill_after = random.Random(str(workdir)).choice(range(save_every, steps, save_every))
    rc, _ = interrupted(argv, cache_dir, tmp_path / "kill.out", kill_after, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    # an (async) save may not have committed yet: the run resumes from the newest committed one
    ckpts = workdir / "checkpoints"
    committed = [
        int(p.name)
        for p in ckpts.iterdir()
        if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file()
    ] if ckpts.is_dir() else []  # fmt: skip
    r = run_ok(argv, cache_dir)
    m = re.search(r"resumed from step (\d+)", r.stdout)
    assert (int(m.group(1)) if m else None) == max(committed, default=None), r.stdout[-2000:]
    assert max(committed, default=0) >= kill_after - save_every
    check_identical(ref_log, workdir / "steps.jsonl", steps)
    return r.stdout


def sigterm_case(argv, workdir, ref_log, steps, save_every, cache_dir, tmp_path):
    rc, text = interrupted(argv, cache_dir, tmp_path / "term.out", save_every, signal.SIGTERM)
    assert rc == 0, text[-2000:]
    assert "SIGTERM: saved step" in text
    r = run_ok(argv, cache_dir)
    check_identical(ref_log, workdir / "steps.jsonl", steps)
    return r.stdout


# ---------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, shared_data, cache_dir):
    wd = tmp_path_factory.mktemp("resume_base")
    text = shared_data / "tinyshakespeare" / "input.txt"
    run_ok(
        [PY, str(REPO / "experiments" / "pretrain.py"), "--preset=tiny"]
        + [f"--train.workdir={wd}", "--train.progress_bar=false", "--train.steps=5"]
        + [f"--data.source=tinyshakespeare:{text}", "--train.num_samples=0"],
        cache_dir,
    )
    return wd


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    words = "love death king night heart blood crown sweet fair honour".split()
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    rows = [{"prompt": f"what is {w}? ", "completion": w[::-1]} for w in words for _ in (0, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # 20 examples: epochs wrap
    return path


FT_STEPS, FT_SAVE = 12, 3


def finetune_argv(base, train_file, workdir, rank):
    return [
        PY, str(REPO / "experiments" / "finetune.py"), f"--checkpoint={base}",
        f"--train_file={train_file}", f"--train.workdir={workdir}",
        f"--finetune.lora.rank={rank}" if rank else "--nofinetune.lora",
        f"--train.steps={FT_STEPS}", f"--train.save_every={FT_SAVE}",
        "--finetune.batch_size=8", "--finetune.seq_len=32", "--train.learning_rate=3e-3",
        "--train.log_step_details",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("rank", [4, 0], ids=["lora", "full"])
def test_finetune_kill_9_and_sigterm_resume_exactly(
    rank, tiny_base, sft_file, cache_dir, tmp_path
):
    ref = tmp_path / "ref"
    run_ok(finetune_argv(tiny_base, sft_file, ref, rank), cache_dir)
    ref_log = ref / "steps.jsonl"
    seen = [i for s in sorted(records(ref_log)) for i in records(ref_log)[s]["example_ids"]]
    # 12 steps x 8 rows over 20 examples: every example once per epoch, in epoch order
    for e in range(len(seen) // 20):
        assert sorted(seen[20 * e : 20 * (e + 1)]) == list(range(20))
    for case in (crash_resume_case, sigterm_case):
        wd = tmp_path / case.__name__
        argv = finetune_argv(tiny_base, sft_file, wd, rank)
        case(argv, wd, ref_log, FT_STEPS, FT_SAVE, cache_dir, tmp_path)
    if rank:  # adapter-only checkpoints: nothing of the frozen base is saved
        assert (ref / "adapters").is_dir()


@pytest.fixture(scope="module")
def byte_base(tmp_path_factory, cache_dir):
    """A tiny decoder with a byte tokenizer (chat markers spelled out in bytes), max_len 256."""
    wd = tmp_path_factory.mktemp("resume_byte_base")
    run_ok(
        [PY, str(REPO / "experiments" / "pretrain.py"), "--preset=tiny", "--data.tokenizer=byte"]
        + ["--model.max_len=256", f"--train.workdir={wd}", "--train.progress_bar=false"]
        + ["--train.steps=3", "--train.num_samples=0", "--train.eval_batches=1"],
        cache_dir,
    )
    return wd


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    words = "love death king night heart blood crown sweet fair honour".split()
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rows = []
    for i, w in enumerate(words * 2):  # 20 conversations of 1 or 2 exchanges
        m = [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]
        m += [{"role": "user", "content": "?"}, {"role": "assistant", "content": w[:2]}] * (i % 2)
        rows.append({"messages": m})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHAT_ROWS = 4


def chat_argv(base, chat, workdir):
    """Packed chat SFT (LoRA): several conversations per row, loss on the assistant turns."""
    return [
        PY, str(REPO / "experiments" / "finetune.py"), f"--checkpoint={base}",
        f"--chat.data={chat}", "--chat.template=chatml", "--finetune.pack",
        f"--train.workdir={workdir}", "--finetune.lora.rank=4", f"--train.steps={FT_STEPS}",
        f"--train.save_every={FT_SAVE}", f"--finetune.batch_size={CHAT_ROWS}",
        "--finetune.seq_len=192", "--train.learning_rate=3e-3", "--train.log_step_details",
    ]  # fmt: skip


@pytest.mark.slow
def test_packed_chat_finetune_kill_9_and_sigterm_resume_exactly(
    byte_base, chat_file, cache_dir, tmp_path
):
    ref = tmp_path / "ref"
    run_ok(chat_argv(byte_base, chat_file, ref), cache_dir)
    ref_log = ref / "steps.jsonl"
    steps = [records(ref_log)[s]["example_ids"] for s in sorted(records(ref_log))]
    assert max(len(ids) for ids in steps) > CHAT_ROWS  # rows hold several conversations
    seen = [i for ids in steps for i in ids]
    for e in range(len(seen) // 20):  # every conversation once per epoch, epochs across rows
        assert sorted(seen[20 * e : 20 * (e + 1)]) == list(range(20))
    for case in (crash_resume_case, sigterm_case):
        wd = tmp_path / case.__name__
        case(chat_argv(byte_base, chat_file, wd), wd, ref_log, FT_STEPS, FT_SAVE, cache_dir,
             tmp_path)  # fmt: skip


# ---------------------------------------------------------------------------- post-training

PT_STEPS, PT_SAVE = 12, 3


def posttrain_argv(base, workdir):
    """DPO with LoRA on the binary's default data: pairs made from the embedded corpus."""
    return [
        PY, str(REPO / "experiments" / "posttrain.py"), f"--checkpoint={base}", "--method=dpo",
        "--train_limit=20", "--eval_limit=8", f"--train.workdir={workdir}",
        f"--train.steps={PT_STEPS}", f"--train.save_every={PT_SAVE}", "--train.eval_every=6",
        "--posttrain.batch_size=8", "--posttrain.seq_len=48", "--posttrain.lora.rank=4",
        "--train.learning_rate=3e-3", "--train.log_step_details",
    ]  # fmt: skip


@pytest.mark.slow
def test_posttrain_dpo_kill_9_and_sigterm_resume_exactly(tiny_base, cache_dir, tmp_path):
    ref = tmp_path / "ref"
    run_ok(posttrain_argv(tiny_base, ref), cache_dir)
    ref_log = ref / "steps.jsonl"
    seen = [i for s in sorted(records(ref_log)) for i in records(ref_log)[s]["example_ids"]]
    for e in range(len(seen) // 20):  # 12 steps x 8 pairs over 20: every pair once an epoch
        assert sorted(seen[20 * e : 20 * (e + 1)]) == list(range(20))
    def cache(wd):
        with np.load(wd / "reference_logps.npz") as z:
            return {k: z[k].tolist() for k in z.files}

    for case in (crash_resume_case, sigterm_case):
        wd = tmp_path / case.__name__
        out = case(posttrain_argv(tiny_base, wd), wd, ref_log, PT_STEPS, PT_SAVE, cache_dir,
                   tmp_path)  # fmt: skip
        assert "reference log-probs: read from" in out, out[-2000:]
        assert cache(wd) == cache(ref)  # the same fingerprint and numbers
    assert (ref / "adapters").is_dir()


def grpo_argv(base, workdir):
    """GRPO with LoRA on generated arithmetic: 4 prompts x 4 samples a step, 2 updates each."""
    return [
        PY, str(REPO / "experiments" / "posttrain.py"), f"--checkpoint={base}", "--method=grpo",
        "--train_limit=24", "--eval_limit=8", f"--train.workdir={workdir}",
        f"--train.steps={PT_STEPS}", f"--train.save_every={PT_SAVE}", "--train.eval_every=6",
        "--posttrain.num_generations=4", "--posttrain.prompts_per_step=4",
        "--posttrain.num_iterations=2", "--posttrain.max_new_tokens=8",
        "--posttrain.prompt_len=24", "--posttrain.lora.rank=4", "--posttrain.temperature=0.9",
        "--train.learning_rate=3e-3", "--train.log_step_details",
    ]  # fmt: skip


@pytest.mark.slow
def test_posttrain_grpo_kill_9_and_sigterm_resume_exactly(byte_base, cache_dir, tmp_path):
    """Samples (the sampler's RNG from (seed, step)), rewards, losses and parameters resume to
    the bit."""
    ref = tmp_path / "ref"
    run_ok(grpo_argv(byte_base, ref), cache_dir)
    ref_log = ref / "steps.jsonl"
    hashes = [r["sample_hash"] for r in records(ref_log).values()]
    assert len(set(hashes)) == len(hashes)  # every step samples anew
    for case in (crash_resume_case, sigterm_case):
        wd = tmp_path / case.__name__
        case(grpo_argv(byte_base, wd), wd, ref_log, PT_STEPS, PT_SAVE, cache_dir, tmp_path)
    assert (ref / "adapters").is_dir()


# ---------------------------------------------------------------------------- alignment

AL_STEPS, AL_SAVE = 10, 2


def align_argv(base, workdir):
    return [
        PY, str(REPO / "experiments" / "align.py"), f"--base={base}",
        f"--train.workdir={workdir}", "--constraint=word:e", "--method=dpg",
        f"--train.steps={AL_STEPS}", f"--train.save_every={AL_SAVE}", "--align.batch_size=8",
        "--align.max_new_tokens=8", "--align.moment_samples=64", "--train.eval_every=5",
        "--align.eval_samples=16", "--train.log_step_details",
    ]  # fmt: skip


@pytest.mark.slow
def test_align_dpg_kill_9_and_sigterm_resume_exactly(tiny_base, cache_dir, tmp_path):
    ref = tmp_path / "ref"
    run_ok(align_argv(tiny_base, ref), cache_dir)
    ref_log = ref / "dpg" / "steps.jsonl"
    for case in (crash_resume_case, sigterm_case):
        wd = tmp_path / case.__name__
        case(align_argv(tiny_base, wd), wd / "dpg", ref_log, AL_STEPS, AL_SAVE, cache_dir,
             tmp_path)  # fmt: skip
        a = json.loads((ref / "summary.json").read_text())["methods"]["dpg"]
        b = json.loads((wd / "summary.json").read_text())["methods"]["dpg"]
        assert a["eval/phi_pi"] == b["eval/phi_pi"] and a["eval/kl_pi_a"] == b["eval/kl_pi_a"]


# ---------------------------------------------------------------------------- image-text

IT_STEPS, IT_SAVE = 12, 3


def image_text_argv(data_dir, out):
    return [
        PY, str(REPO / "experiments" / "train_image_text.py"), "--image_text.source=digits",
        f"--image_text.data_dir={data_dir}", "--image_text.num_train=64",
        "--image_text.num_test=8", f"--train.steps={IT_STEPS}", "--image_text.batch_size=8",
        "--image_text.width=32", "--image_text.layers=1", f"--train.workdir={out}",
        f"--train.save_every={IT_SAVE}", "--train.log_step_details",
    ]  # fmt: skip


@pytest.mark.slow
def test_image_text_kill_9_and_sigterm_resume_exactly(cache_dir, tmp_path):
    data = tmp_path / "scenes"
    ref = tmp_path / "ref"
    run_ok(image_text_argv(data, ref), cache_dir)
    ref_log = ref / "contrastive" / "steps.jsonl"
    hashes = [r["batch_hash"] for r in records(ref_log).values()]
    assert len(set(hashes)) == len(hashes)  # 12 batches of 8 over 64 scenes, reshuffled
    for case in (crash_resume_case, sigterm_case):
        out = tmp_path / case.__name__
        case(image_text_argv(data, out), out / "contrastive", ref_log, IT_STEPS, IT_SAVE,
             cache_dir, tmp_path)  # fmt: skip


# ---------------------------------------------------------------------------- LSTM LM (PTB)

RNN_SAVE = 8


def rnn_argv(workdir):
    return [
        PY, str(REPO / "experiments" / "train_rnn_lm.py"), "--limit_train_lines=30",
        "--limit_eval_lines=5", "--lstm.hidden=16", "--bptt.batch_size=4",
        "--bptt.num_steps=6", "--bptt.epochs=2", f"--train.save_every={RNN_SAVE}",
        "--train.log_every=4", "--train.log_step_details=true", f"--train.workdir={workdir}",
    ]  # fmt: skip


@pytest.mark.slow
def test_rnn_lm_kill_9_and_sigterm_resume_exactly(cache_dir, tmp_path):
    ref = tmp_path / "ref"
    out = run_ok(rnn_argv(ref), cache_dir).stdout
    ref_log = ref / "steps.jsonl"
    recs = records(ref_log)
    steps = len(recs)
    assert steps == 2 * (max(r["window"] for r in recs.values()) + 1)  # two epochs of windows
    assert '"test_ppl"' in out
    for case in (crash_resume_case, sigterm_case):
        wd = tmp_path / case.__name__
        case(rnn_argv(wd), wd, ref_log, steps, RNN_SAVE, cache_dir, tmp_path)


# ---------------------------------------------------------------------------- sequence labelling

TAG_SAVE = 4


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer, 32-wide BERT folder with all-MiniLM-L6-v2's tokenizer."""
    import shutil

    import jax
    import jax.numpy as jnp

    from lm_jax.configs.encoder import EncoderConfig, bert_style
    from lm_jax.convert import hf_bert
    from lm_jax.nn.encoder import Encoder

    d = tmp_path_factory.mktemp("tiny_bert")
    model = bert_style(vocab_size=30522, d_model=32, num_layers=2, num_heads=2, mlp_dim=64,
                       max_len=64)  # fmt: skip
    cfg = EncoderConfig(model, head="none", pooler=True)
    params = Encoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    hf_bert.to_hf(cfg, params, str(d))
    src = pathlib.Path(hf_bert.packaged_minilm_dir())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / name, d / name)
    return d


def tagger_argv(init, workdir):
    return [
        PY, str(REPO / "experiments" / "train_tagger.py"), "--task=ner_wnut16",
        f"--init={init}", "--limit_train=48", "--limit_eval=8", "--tagger.batch_size=8",
        "--tagger.epochs=2", "--tagger.pool_batches=2", f"--train.save_every={TAG_SAVE}",
        "--train.log_every=4", "--train.log_step_details=true", f"--train.workdir={workdir}",
    ]  # fmt: skip


@pytest.mark.slow
def test_tagger_kill_9_and_sigterm_resume_exactly(cache_dir, tmp_path, tiny_bert):
    ref = tmp_path / "ref"
    out = run_ok(tagger_argv(tiny_bert, ref), cache_dir).stdout
    ref_log = ref / "steps.jsonl"
    recs = records(ref_log)
    steps = len(recs)
    assert steps == 12  # two epochs of 6 batches of 8 sentences
    hashes = [r["batch_hash"] for r in recs.values()]
    assert len(set(hashes)) == len(hashes)  # the second epoch is reshuffled
    assert '"test_entity_f1"' in out and '"most_frequent_tag_baseline"' in out
    for case in (crash_resume_case, sigterm_case):
        wd = tmp_path / case.__name__
        case(tagger_argv(tiny_bert, wd), wd, ref_log, steps, TAG_SAVE, cache_dir, tmp_path)


MLM_SAVE = 4


def mlm_argv(init, text, workdir):
    return [
        PY, str(REPO / "experiments" / "pretrain_mlm.py"), f"--init={init}",
        f"--text_files={text}", "--mlm.batch_size=8", "--mlm.max_tokens=32",
        "--mlm.eval_fraction=0.1", "--train.steps=12", f"--train.save_every={MLM_SAVE}",
        "--train.log_every=4", "--train.log_step_details=true", f"--train.workdir={workdir}",
    ]  # fmt: skip


@pytest.mark.slow
def test_mlm_kill_9_and_sigterm_resume_exactly(cache_dir, tmp_path, tiny_bert, shared_data):
    """MLM masks are drawn per step: the resumed run sees the same masked batches."""
    text = tmp_path / "text.txt"
    text.write_text((shared_data / "tinyshakespeare" / "input.txt").read_text()[:12000])
    ref = tmp_path / "ref"
    out = run_ok(mlm_argv(tiny_bert, text, ref), cache_dir).stdout
    ref_log = ref / "steps.jsonl"
    assert len(records(ref_log)) == 12 and '"mlm_perplexity"' in out
    assert (ref / "hf" / "model.safetensors").is_file()
    for case in (crash_resume_case, sigterm_case):
        wd = tmp_path / case.__name__
        case(mlm_argv(tiny_bert, text, wd), wd, ref_log, 12, MLM_SAVE, cache_dir, tmp_path)


# ---------------------------------------------------------------------------- seq2seq (T5)

S2S_SAVE = 4


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory, shared_data):
    """48 Multi30k training pairs as plain line-aligned files (train) and 4 for val / test."""
    import gzip

    d = tmp_path_factory.mktemp("pairs")
    for lang in ("en", "de"):
        with gzip.open(shared_data / "multi30k" / f"train.{lang}.gz", "rt") as f:
            lines = [next(f) for _ in range(56)]
        (d / f"train.{lang}").write_text("".join(lines[:48]))
        (d / f"val.{lang}").write_text("".join(lines[48:52]))
    return d


def seq2seq_argv(d, workdir):
    return [
        PY, str(REPO / "experiments" / "train_seq2seq.py"), "--task=files",
        f"--train_files={d / 'train.en'},{d / 'train.de'}",
        f"--val_files={d / 'val.en'},{d / 'val.de'}", "--vocab_size=400",
        "--t5.model.d_model=32", "--t5.model.num_layers=1", "--t5.model.num_heads=2",
        "--t5.model.head_dim=8", "--t5.model.mlp_dim=64", "--seq2seq.batch_size=8",
        "--seq2seq.pool_batches=2", "--train.steps=12", "--seq2seq.num_beams=2",
        "--seq2seq.max_new_tokens=6", f"--train.save_every={S2S_SAVE}", "--train.log_every=4",
        "--train.log_step_details=true", f"--train.workdir={workdir}",
    ]  # fmt: skip


def span_argv(d, workdir):
    return [
        PY, str(REPO / "experiments" / "train_seq2seq.py"), "--task=span_corruption",
        f"--text_files={d / 'train.en'},{d / 'train.de'}", "--vocab_size=400",
        "--t5.model.d_model=32", "--t5.model.num_layers=1", "--t5.model.num_heads=2",
        "--t5.model.head_dim=8", "--t5.model.mlp_dim=64", "--seq2seq.batch_size=4",
        "--seq2seq.pool_batches=2", "--span.row_tokens=32", "--span.eval_fraction=0.1",
        "--seq2seq.max_new_tokens=6", "--train.steps=12", f"--train.save_every={S2S_SAVE}",
        "--train.log_every=4", "--train.log_step_details=true", f"--train.workdir={workdir}",
    ]  # fmt: skip


@pytest.mark.slow
def test_span_corruption_kill_9_and_sigterm_resume_exactly(cache_dir, tmp_path, pair_files):
    """Span corruption draws its noise per step: the resumed run sees the same pairs."""
    ref = tmp_path / "ref"
    out = run_ok(span_argv(pair_files, ref), cache_dir).stdout
    ref_log = ref / "steps.jsonl"
    assert len(records(ref_log)) == 12 and '"val_ppl"' in out and '"rows"' in out
    for case in (crash_resume_case, sigterm_case):
        wd = tmp_path / case.__name__
        case(span_argv(pair_files, wd), wd, ref_log, 12, S2S_SAVE, cache_dir, tmp_path)


@pytest.mark.slow
def test_seq2seq_kill_9_and_sigterm_resume_exactly(cache_dir, tmp_path, pair_files):
    ref = tmp_path / "ref"
    out = run_ok(seq2seq_argv(pair_files, ref), cache_dir).stdout
    ref_log = ref / "steps.jsonl"
    recs = records(ref_log)
    assert len(recs) == 12
    hashes = [r["batch_hash"] for r in recs.values()]
    assert len(set(hashes[:6])) == 6 and hashes[:6] != hashes[6:]  # epoch 2 is reshuffled
    assert '"val_bleu"' in out and '"val_ppl"' in out
    # evaluate.py reads the encoder-decoder workdir and translates with beam search
    evaluate = [PY, str(REPO / "experiments" / "evaluate.py"), f"--checkpoint={ref}",
                "--task=multi30k_en_de", "--limit=3", "--batch_size=4"]  # fmt: skip
    ev = run_ok(evaluate, cache_dir).stdout
    assert re.search(r"^bleu\s+\d", ev, re.M) and re.search(r"^num_beams\s+2$", ev, re.M), ev
    for case in (crash_resume_case, sigterm_case):
        wd = tmp_path / case.__name__
        case(seq2seq_argv(pair_files, wd), wd, ref_log, 12, S2S_SAVE, cache_dir, tmp_path)
