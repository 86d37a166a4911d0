"""The bad-input matrix of every binary in experiments/ (lm_jax/cli.py's exit policy): a
missing file, a malformed file, a wrong checkpoint kind, a bad flag value and a mesh that does
not fit the devices each exit 2 with exactly one `error:` line naming the problem and no
traceback; a bad flag on a workdir that holds a run leaves its files as they were; old flag
spellings still work with one `warning:` line. Each case runs the binary's file as `__main__` in
a child forked from one warm interpreter (warm_binaries.py: its own argv, flags, cwd and exit
code, without the 4-6 s of imports a cold process spends), and fails before anything compiles
(the shared tiny checkpoint is the only training); a few cases also run as cold subprocesses and
must give the same exit code and error line."""

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from warm_binaries import WarmBinaries

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 120


def env():
    e = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    e["JAX_PLATFORMS"] = "cpu"
    e.pop("LM_JAX_FAULTS", None)
    return e


WARM = WarmBinaries(env())


def binary(name, *args):
    """`python experiments/<name>.py args` in a warm forked child."""
    argv = [str(REPO / "experiments" / f"{name}.py"), *map(str, args)]
    return WARM.run(argv, cwd=str(REPO), timeout=TIMEOUT)


def cold_binary(name, *args):
    """The same in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, str(REPO / "experiments" / f"{name}.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env(),
        cwd=REPO,
    )


def one_error_line(r, pattern: str) -> str:
    """Exit 2, exactly one `error:` line (matching `pattern`), no traceback."""
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [x for x in out.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, out[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def tree_hash(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-step tiny pretraining run (checkpoint at step 2) on the embedded corpus: a decoder
    checkpoint to point at."""
    wd = tmp_path_factory.mktemp("base") / "w"
    r = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "pretrain.py"), "--preset=tiny"]
        + [f"--train.workdir={wd}", "--train.steps=2", "--train.save_every=2"]
        + ["--train.num_samples=0", "--train.eval_batches=1", "--train.progress_bar=false"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Missing, malformed and wrong-kind inputs, made by hand (nothing trains)."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "adapters" / "adapters").mkdir(parents=True)  # a LoRA fine-tune's workdir
    (d / "adapters" / "adapters" / "lora_adapter.json").write_text('{"format": "x"}')
    (d / "adapters" / "metrics.jsonl").write_text('{"step": 1}\n')
    (d / "image_text").mkdir()  # an experiments/train_image_text.py workdir
    (d / "image_text" / "contrastive_params.msgpack").write_bytes(b"\x80")
    (d / "image_text" / "contrastive.json").write_text("{}")
    (d / "empty").mkdir()
    (d / "junk" / "checkpoints" / "1").mkdir(parents=True)  # a step folder without a checkpoint
    (d / "junk" / "checkpoints" / "1" / "x").write_text("junk")
    (d / "bad.gguf").write_bytes(b"not a gguf file at all")
    (d / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    (d / "nokey.jsonl").write_text('{"prompt": "a"}\n')
    (d / "good.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    pair = '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (d / "good_chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    robot = [{"role": "robot", "content": "beep"}]
    (d / "badrole.jsonl").write_text(json.dumps({"messages": chat}) + "\n"
                                     + json.dumps({"messages": robot}) + "\n")  # fmt: skip
    (d / "noassistant.jsonl").write_text(json.dumps({"messages": chat[:1]}) + "\n")
    (d / "good_pairs.jsonl").write_text(pair)
    (d / "norejected.jsonl").write_text(pair + '{"prompt": "a", "chosen": "b"}\n')
    (d / "badpairs.jsonl").write_text(pair + '{"prompt": "a"\n')
    (d / "emptychosen.jsonl").write_text('{"prompt": "a", "chosen": "", "rejected": "c"}\n')
    (d / "sst2" / "sst2").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (d / "sst2" / "sst2" / f"stsa.binary.{split}").write_text("positive a fine film\n")
    (d / "a_file").write_text("x")
    (d / "good.tsv").write_text("Paris\tB-loc\nis\tO\n\nBob\tB-per\n")
    (d / "bad.tsv").write_text("Paris\tB-loc\nlonely\n")
    (d / "two.en").write_text("a dog\na cat\n")
    (d / "one.de").write_text("ein Hund\n")
    (d / "two.de").write_text("ein Hund\neine Katze\n")
    (d / "long.en").write_text("a " * 300 + "\nshort\n")
    (d / "binary.en").write_bytes(b"\xff\xfe\x00bad\n\x80\n")
    return d


MISSING = "/nonexistent/lm_jax_bad_input"

# ---------------------------------------------------------------- pretrain

PRETRAIN = {
    "missing_corpus": (["--data.source=file:/nonexistent/corpus*.txt"], r"no such file"),
    "malformed_tokenizer": ([], r"tokenizer"),  # the workdir's tokenizer manifest is not JSON
    "adapter_dir_as_workdir": (["--train.workdir={adapters}"], r"LoRA adapters.*folder of its"),
    "image_text_dir_as_workdir": (["--train.workdir={image_text}"], r"image-text run"),
    "bad_flag_value": (["--train.steps=abc"], r"--train\.steps=abc"),
    "bad_config_value": (["--train.steps=0"], r"steps must be > 0.*--train\.steps"),
    "unknown_flag": (["--train.stepz=3"], r"train\.stepz.*train\.steps"),
    "mesh_vs_devices": (["--train.mesh=data:3"], r"needs 3 devices but 2.*--train\.mesh="),
    "malformed_mesh": (["--train.mesh=data=2"], r"malformed mesh.*--train\.mesh="),
    "positional": (["extra"], r"positional"),
}


@pytest.mark.parametrize("case", sorted(PRETRAIN))
def test_pretrain(case, files, tmp_path):
    args, pattern = PRETRAIN[case]
    wd = tmp_path / "w"
    if case == "malformed_tokenizer":
        (wd / "tokenizer").mkdir(parents=True)
        (wd / "tokenizer" / "lm_jax_tokenizer.json").write_text("{not json")
    args = [a.format(**{k: files / k for k in ("adapters", "image_text")}) for a in args]
    r = binary("pretrain", "--preset=tiny", f"--train.workdir={wd}", *args)
    one_error_line(r, pattern)
    assert not (wd / "checkpoints").exists()


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--train.steps=abc"], r"--train\.steps=abc"),
        (["--model.d_model=32"], r"has shape .* but the model config gives"),
        (["--train.mesh=data:3"], r"needs 3 devices"),
        (["--data.seq_len=32"], r"another row stream: data\.seq_len"),
    ],
)
def test_pretrain_resume_with_a_bad_flag_leaves_the_checkpoint_intact(
    base, tmp_path, args, pattern
):
    wd = tmp_path / "w"
    shutil.copytree(base, wd)
    before = tree_hash(wd)
    r = binary("pretrain", "--preset=tiny", f"--train.workdir={wd}", "--train.steps=4", *args)
    one_error_line(r, pattern)
    assert tree_hash(wd) == before


# ---------------------------------------------------------------- finetune

FINETUNE = {
    "missing_train_file": (["--train_file=/nonexistent/train.jsonl"], r"not found"),
    "malformed_jsonl": (["--train_file={bad.jsonl}"], r"bad\.jsonl:2: .*JSON object"),
    "jsonl_without_completion": (["--train_file={nokey.jsonl}"], r"nokey\.jsonl:1"),
    "missing_checkpoint": ([f"--checkpoint={MISSING}"], r"does not exist"),
    "adapters_as_checkpoint": (["--checkpoint={adapters}"], r"holds LoRA adapters"),
    "image_text_as_checkpoint": (["--checkpoint={image_text}"], r"image-text workdir"),
    "random_dir_as_checkpoint": (["--checkpoint={empty}"], r"not an lm_jax training directory"),
    "unreadable_checkpoint": (["--checkpoint={junk}"], r"unreadable"),
    "bad_flag_value": (["--train.learning_rate=abc"], r"--train\.learning_rate=abc"),
    "bad_config_value": (["--finetune.seq_len=1"], r"seq_len must be >= 2.*--finetune\.seq_len"),
    "lora_only_option": (["--nofinetune.lora", "--finetune.bf16_base"], r"LoRA only"),
    "unused_train_flag": (["--train.eval_batches=3"], r"train\.eval_batches"),
    "unknown_task": (["--task=imdb"], r"unknown task"),
    "mesh_vs_devices": (["--train.mesh=data:3"], r"needs 3 devices but 2.*--train\.mesh="),
    "chat_unknown_role": (
        ["--chat.data={badrole.jsonl}"],
        r"badrole\.jsonl:2: message 0 has role 'robot'; roles are",
    ),
    "chat_no_assistant_turn": (["--chat.data={noassistant.jsonl}"], r"jsonl:1: no assistant turn"),
    "chat_and_train_file": (
        ["--chat.data={good_chat.jsonl}", "--train_file={good.jsonl}"],
        r"--train_file or --chat\.data, not both",
    ),
    "chat_unknown_spec": (["--chat.data=squad:/x"], r"jsonl:<path> or topical_chat:<path>"),
    "chat_missing_topical_chat": (["--chat.data=topical_chat:/nonexistent/t.json"], r"not found"),
    "chat_unknown_template": (
        ["--chat.data={good_chat.jsonl}", "--chat.template=zephyr"],
        r"unknown chat template 'zephyr'.*--chat\.template",
    ),
    "chat_add_eos": (
        ["--chat.data={good_chat.jsonl}", "--finetune.add_eos"],
        r"drop --finetune\.add_eos",
    ),
}


def _fmt(args, files, base=None):
    names = {p.name: p for p in files.iterdir()}
    if base is not None:
        names["base"] = base
    return [re.sub(r"\{([\w.]+)\}", lambda m: str(names[m.group(1)]), a) for a in args]


@pytest.mark.parametrize("case", sorted(FINETUNE))
def test_finetune(case, files, tmp_path):
    args, pattern = FINETUNE[case]
    args = _fmt(args, files)
    if not any(a.startswith("--checkpoint") for a in args):
        args.append(f"--checkpoint={files / 'empty'}")  # bad flags fail before the model loads
    if not any(a.startswith(("--train_file", "--task", "--chat.data")) for a in args):
        args.append(f"--train_file={files / 'good.jsonl'}")
    r = binary("finetune", f"--train.workdir={tmp_path / 'w'}", *args)
    one_error_line(r, pattern)
    assert not (tmp_path / "w").exists()


def test_finetune_bad_lora_target_after_loading_leaves_the_workdir_intact(base, files, tmp_path):
    wd = tmp_path / "w"
    shutil.copytree(files / "adapters", wd)  # an earlier fine-tune's adapters
    before = tree_hash(wd)
    r = binary(
        "finetune",
        f"--checkpoint={base}",
        f"--train_file={files / 'good.jsonl'}",
        "--finetune.lora.targets=attn/q_proj,attn/nope_proj",
        f"--train.workdir={wd}",
    )
    one_error_line(r, r"'attn/nope_proj' matches no kernel")
    assert tree_hash(wd) == before


def test_finetune_old_spellings_warn_and_still_apply(files, tmp_path):
    r = binary(
        "finetune",
        f"--checkpoint={files / 'empty'}",
        f"--train_file={files / 'good.jsonl'}",
        "--lora_rank=0",
        "--bf16_base",
        f"--workdir={tmp_path / 'w'}",
    )
    one_error_line(r, r"LoRA only.*--finetune\.bf16_base")  # both old flags took effect
    warnings = [x for x in r.stderr.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 3, r.stderr
    assert any("--lora_rank" in w and "--finetune.lora.rank" in w for w in warnings)
    assert any("--workdir" in w and "--train.workdir" in w for w in warnings)
    r = binary("finetune", "--steps=0", f"--train_file={files / 'good.jsonl'}")
    one_error_line(r, r"steps must be > 0.*--train\.steps")
    assert "use --train.steps" in r.stderr


# ---------------------------------------------------------------- posttrain

POSTTRAIN = {
    "missing_rejected": (
        ["--train_file={norejected.jsonl}"],
        r"norejected\.jsonl:2: missing key 'rejected'",
    ),
    "empty_completion": (
        ["--train_file={emptychosen.jsonl}"],
        r"emptychosen\.jsonl:1: 'chosen' is empty",
    ),
    "empty_eval_completion": (
        ["--eval_file={emptychosen.jsonl}"],
        r"emptychosen\.jsonl:1: 'chosen'",
    ),
    "missing_train_file": (["--train_file=/nonexistent/pairs.jsonl"], r"not found"),
    "malformed_jsonl": (["--train_file={badpairs.jsonl}"], r"badpairs\.jsonl:2: not JSON"),
    "sft_file_as_pairs": (["--train_file={good.jsonl}"], r"good\.jsonl:1: missing key 'chosen'"),
    "missing_checkpoint": ([f"--checkpoint={MISSING}"], r"does not exist"),
    "adapters_as_checkpoint": (["--checkpoint={adapters}"], r"holds LoRA adapters"),
    "unknown_method": (["--method=kto"], r"--method.*dpo.*simpo"),
    "bad_flag_value": (["--posttrain.beta=abc"], r"--posttrain\.beta=abc"),
    "bad_config_value": (["--posttrain.seq_len=1"], r"seq_len must be >= 2.*--posttrain\.seq_len"),
    "gamma_without_simpo": (["--posttrain.gamma=0.5"], r"gamma is SimPO's.*--posttrain\.gamma"),
    "unused_train_flag": (["--train.eval_batches=3"], r"train\.eval_batches"),
    "mesh_vs_devices": (["--train.mesh=data:3"], r"needs 3 devices but 2.*--train\.mesh="),
}


@pytest.mark.parametrize("case", sorted(POSTTRAIN))
def test_posttrain(case, files, tmp_path):
    args, pattern = POSTTRAIN[case]
    args = _fmt(args, files)
    if not any(a.startswith("--checkpoint") for a in args):
        args.append(f"--checkpoint={files / 'empty'}")  # bad flags fail before the model loads
    if not any(a.startswith("--train_file") for a in args):
        args.append(f"--train_file={files / 'good_pairs.jsonl'}")
    r = binary("posttrain", f"--train.workdir={tmp_path / 'w'}", *args)
    one_error_line(r, pattern)
    assert not (tmp_path / "w").exists()


GRPO = {
    "unknown_reward": (["--posttrain.reward=bleu"], r"unknown reward 'bleu'.*--posttrain\.reward"),
    "one_generation": (
        ["--posttrain.num_generations=1"],
        r"num_generations must be >= 2.*--posttrain\.num_generations",
    ),
    "unknown_loss_type": (["--posttrain.loss_type=ppo"], r"--posttrain\.loss_type"),
    "greedy_temperature": (["--posttrain.temperature=0"], r"temperature must be > 0"),
    "preference_flag": (["--posttrain.seq_len=64"], r"--posttrain\.seq_len applies to the pref"),
    "grpo_flag_with_dpo": (
        ["--method=dpo", "--posttrain.num_generations=4"],
        r"--posttrain\.num_generations applies to --method=grpo only, not --method=dpo",
    ),
    "prompts_without_answers": (["--train_file={good_pairs.jsonl}"], r"needs an 'answer'"),
    "malformed_prompts": (["--train_file={bad.jsonl}"], r"bad\.jsonl:2: not JSON"),
    "missing_prompts": (["--train_file=/nonexistent/prompts.jsonl"], r"not found"),
    "not_a_bigbench_task": (["--eval_file={a_file}.json"], r"not found|BIG-bench"),
    "second_eval_file_missing": (
        ["--eval_file={good_pairs.jsonl},/nonexistent/task.json"],
        r"/nonexistent/task\.json.*not found",
    ),
    "mesh_vs_devices": (["--train.mesh=data:3"], r"needs 3 devices but 2.*--train\.mesh="),
}


@pytest.mark.parametrize("case", sorted(GRPO))
def test_posttrain_grpo(case, files, tmp_path):
    args, pattern = GRPO[case]
    args = _fmt(args, files)
    if not any(a.startswith("--method") for a in args):
        args.append("--method=grpo")
    args.append(f"--checkpoint={files / 'empty'}")  # bad input fails before the model loads
    r = binary("posttrain", f"--train.workdir={tmp_path / 'w'}", *args)
    one_error_line(r, pattern)
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- align

ALIGN = {
    "missing_base": ([f"--base={MISSING}"], r"does not exist.*--base"),
    "malformed_gguf_base": (["--base={bad.gguf}"], r"not a readable GGUF"),
    "adapters_as_base": (["--base={adapters}"], r"holds LoRA adapters"),
    "image_text_as_base": (["--base={image_text}"], r"image-text workdir"),
    "random_dir_as_base": (["--base={empty}"], r"not an lm_jax training directory"),
    "bad_flag_value": (["--align.batch_size=abc"], r"--align\.batch_size=abc"),
    "bad_config_value": (["--align.batch_size=0"], r"batch_size must be >= 1.*--align\."),
    "unknown_method": (["--method=nope"], r"unknown method 'nope'"),
    "baseline_two_constraints": (
        ["--method=dpg,dpo", "--constraint=word:a", "--constraint=word:b"],
        r"--method=dpo/grpo take exactly one --constraint",
    ),
    "grpo_batch_not_groups": (
        ["--method=grpo", "--align.batch_size=12"], r"groups of 8.*multiple of 8, got 12"
    ),
    "unknown_schedule": (["--train.lr_schedule=wsd"], r"unknown lr schedule"),
    "unknown_constraint": (["--base={base}", "--constraint=colour:blue"], r"colour"),
    "mesh_vs_devices": (["--train.mesh=data:3"], r"needs 3 devices but 2.*--train\.mesh="),
}


@pytest.mark.parametrize("case", sorted(ALIGN))
def test_align(case, base, files, tmp_path):
    args, pattern = ALIGN[case]
    args = _fmt(args, files, base)
    if not any(a.startswith("--base") for a in args):
        args.append(f"--base={files / 'empty'}")
    if not any(a.startswith("--constraint") for a in args):
        args.append("--constraint=word:e")
    r = binary("align", f"--train.workdir={tmp_path / 'w'}", *args)
    one_error_line(r, pattern)
    assert not (tmp_path / "w").exists()


def test_align_old_spelling_and_workdir_intact(files, tmp_path):
    wd = tmp_path / "w"
    (wd / "dpg").mkdir(parents=True)
    (wd / "summary.json").write_text(json.dumps({"methods": {}}))
    before = tree_hash(wd)
    r = binary(
        "align", f"--base={files / 'empty'}", "--constraint=word:e", "--lr=-1", f"--workdir={wd}"
    )
    one_error_line(r, r"learning_rate must be > 0.*--train\.learning_rate")
    assert "--lr is deprecated" in r.stderr and "use --train.learning_rate" in r.stderr
    assert tree_hash(wd) == before


# ---------------------------------------------------------------- train_image_text

IMAGE_TEXT = {
    "data_dir_under_a_file": (["--image_text.data_dir={a_file}/scenes"], r"is a file"),
    "workdir_is_a_file": (["--train.workdir={a_file}"], r"is a file"),
    "decoder_checkpoint_as_workdir": (["--train.workdir={base}"], r"decoder training run"),
    "adapters_as_workdir": (["--train.workdir={adapters}"], r"LoRA adapters"),
    "bad_flag_value": (["--image_text.mode=foo"], r"--image_text\.mode=foo"),
    "bad_config_value": (["--image_text.patch=7"], r"patch must divide.*--image_text\.patch"),
    "unknown_source": (["--image_text.source=nope"], r"source must be"),
    "batch_vs_devices": (["--image_text.batch_size=15"], r"not divisible by the 2"),
    "mesh_vs_devices": (["--train.mesh=data:3"], r"needs 3 devices but 2.*--train\.mesh="),
    "old_spelling": (["--batch=0"], r"batch_size must be >= 1.*--image_text\.batch_size"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_TEXT))
def test_train_image_text(case, base, files, tmp_path):
    args, pattern = IMAGE_TEXT[case]
    args = _fmt(args, files, base)
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "contrastive.json").write_text("{}")  # an earlier run's results
    before = {p: tree_hash(p) for p in (wd, base, files)}
    scenes = ["--image_text.data_dir=" + str(tmp_path / "scenes")]
    r = binary("train_image_text", f"--train.workdir={wd}", *scenes, *args)
    one_error_line(r, pattern)
    if case == "old_spelling":
        assert "use --image_text.batch_size" in r.stderr
    assert {p: tree_hash(p) for p in before} == before
    assert not (tmp_path / "scenes").exists()


def run_training_case(name, table, case, base, files, tmp_path):
    """A training binary's case from `table`: one error line, the inputs untouched, no workdir."""
    args, pattern = table[case]
    args = _fmt(args, files, base)
    before = {p: tree_hash(p) for p in (base, files)}
    wd = [] if any(a.startswith("--train.workdir") for a in args) else [
        f"--train.workdir={tmp_path / 'w'}"
    ]  # fmt: skip
    one_error_line(binary(name, *wd, *args), pattern)
    assert {p: tree_hash(p) for p in before} == before
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- train_rnn_lm

RNN_LM = {
    "workdir_is_a_file": (["--train.workdir={a_file}"], r"is a file"),
    "decoder_checkpoint_as_workdir": (["--train.workdir={base}"], r"another kind of run"),
    "adapters_as_workdir": (["--train.workdir={adapters}"], r"LoRA adapters"),
    "unknown_preset": (["--preset=large"], r"--preset"),
    "bad_window": (["--bptt.num_steps=0"], r"num_steps .*must all be >= 1.*--bptt\.num_steps"),
    "bad_dropout": (["--lstm.dropout=1.5"], r"dropout must be in \[0, 1\).*--lstm\.dropout"),
    "wrong_vocab": (["--lstm.vocab_size=50"], r"vocabulary's 10000 words"),
}


@pytest.mark.parametrize("case", sorted(RNN_LM))
def test_train_rnn_lm(case, base, files, tmp_path):
    run_training_case("train_rnn_lm", RNN_LM, case, base, files, tmp_path)


# ---------------------------------------------------------------- train_tagger

TAGGER = {
    "missing_file": (["--task=files", f"--train_file={MISSING}.tsv", "--dev_file={good.tsv}",
                      "--test_file={good.tsv}"], r"not found"),  # fmt: skip
    "missing_file_flag": (["--task=files", "--train_file={good.tsv}"], r"missing: dev, test"),
    "malformed_file": (["--task=files", "--train_file={bad.tsv}", "--dev_file={good.tsv}",
                        "--test_file={good.tsv}"],
                       r"bad.tsv:2: expected token<TAB>tag"),  # fmt: skip
    "tags_outside_labels": (["--task=files", "--train_file={good.tsv}", "--dev_file={good.tsv}",
                             "--test_file={good.tsv}", "--labels=O,B-loc"],
                            r"tags outside the label set \(B-per\).*--labels"),  # fmt: skip
    "decoder_checkpoint_as_workdir": (["--train.workdir={base}"], r"another kind of run"),
    "adapters_as_workdir": (["--train.workdir={adapters}"], r"LoRA adapters"),
    "workdir_is_a_file": (["--train.workdir={a_file}"], r"is a file"),
    "bad_flag_value": (["--tagger.max_tokens=abc"], r"--tagger\.max_tokens=abc"),
    "bad_config_value": (["--tagger.max_tokens=2"], r"max_tokens must be >= 4"),
    "mesh_vs_devices": (["--train.mesh=data:3"], r"needs 3 devices but 2.*--train\.mesh="),
    "batch_vs_mesh": (["--tagger.batch_size=3"], r"not a multiple of the mesh's data axis"),
    "unknown_task": (["--task=chunking"], r"--task"),
    "missing_init": (["--task=files", "--train_file={good.tsv}", "--dev_file={good.tsv}",
                      "--test_file={good.tsv}", f"--init={MISSING}"],
                     r"neither a folder"),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(TAGGER))
def test_train_tagger(case, base, files, tmp_path):
    run_training_case("train_tagger", TAGGER, case, base, files, tmp_path)


# ---------------------------------------------------------------- pretrain_mlm

MLM = {
    "missing_text": ([f"--text_files={MISSING}.txt"], r"--text_files: .* is not a file"),
    "bad_rate": (["--mlm.rate=1.5"], r"mlm\.rate must be in \(0, 1\)"),
    "decoder_checkpoint_as_workdir": (["--train.workdir={base}"], r"another kind of run"),
    "workdir_is_a_file": (["--train.workdir={a_file}"], r"is a file"),
    "batch_vs_mesh": (["--mlm.batch_size=3"], r"not a multiple of the mesh's data axis"),
    "missing_init": ([f"--init={MISSING}"], r"neither a folder"),
}


@pytest.mark.parametrize("case", sorted(MLM))
def test_pretrain_mlm(case, base, files, tmp_path):
    run_training_case("pretrain_mlm", MLM, case, base, files, tmp_path)


# ---------------------------------------------------------------- train_seq2seq

SEQ2SEQ = {
    "missing_file": (["--task=files", f"--train_files={MISSING}.en,{{two.de}}"], r"not found"),
    "one_file": (["--task=files", "--train_files={two.en}"], r"SOURCE,TARGET"),
    "mismatched_files": (["--task=files", "--train_files={two.en},{one.de}"],
                         r"2 source lines but 1 target lines"),  # fmt: skip
    "malformed_file": (["--task=files", "--train_files={binary.en},{two.de}"], r"UTF-8"),
    "source_too_long": (["--task=files", "--train_files={long.en},{two.de}", "--vocab_size=300"],
                        r"pair 0: .*max_source_len=128"),  # fmt: skip
    "decoder_checkpoint_as_workdir": (["--train.workdir={base}"], r"another kind of run"),
    "adapters_as_workdir": (["--train.workdir={adapters}"], r"LoRA adapters"),
    "bad_flag_value": (["--seq2seq.batch_size=abc"], r"--seq2seq\.batch_size=abc"),
    "bad_config_value": (["--seq2seq.label_smoothing=1.5"], r"label_smoothing must be in"),
    "mesh_vs_devices": (["--train.mesh=data:3"], r"needs 3 devices but 2.*--train\.mesh="),
    "batch_vs_mesh": (["--seq2seq.batch_size=3"], r"not a multiple of the mesh's data axis"),
    "span_missing_text": (["--task=span_corruption", f"--text_files={MISSING}.txt"],
                          r"not found"),  # fmt: skip
    "span_bad_config": (["--task=span_corruption", "--span.noise_density=0"],
                        r"span\.noise_density must be in \(0, 1\)"),  # fmt: skip
    "span_vocab_without_sentinels": (["--task=span_corruption", "--text_files={two.en}",
                                      "--vocab_size=270", "--t5.model.vocab_size=270"],
                                     r"tokenizer's \d+ \+ 100 sentinels"),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(SEQ2SEQ))
def test_train_seq2seq(case, base, files, tmp_path):
    run_training_case("train_seq2seq", SEQ2SEQ, case, base, files, tmp_path)


# ---------------------------------------------------------------- generate

GENERATE = {
    "missing_checkpoint": ([f"--checkpoint={MISSING}"], r"does not exist"),
    "missing_gguf": ([f"--gguf={MISSING}.gguf"], r"not found"),
    "malformed_gguf": (["--gguf={bad.gguf}"], r"not a readable GGUF"),
    "unknown_gguf_name": (["--gguf=gemma7"], r"neither a GGUF file nor .*'gemma3', 'smollm2'"),
    "no_adapters_in_folder": (
        ["--checkpoint={base}", "--adapters={empty}"], r"holds no LoRA adapters"
    ),
    "unreadable_checkpoint": (["--checkpoint={junk}"], r"unreadable"),
    "adapters_as_checkpoint": (["--checkpoint={adapters}"], r"holds LoRA adapters"),
    "image_text_as_checkpoint": (["--checkpoint={image_text}"], r"image-text workdir"),
    "random_dir_as_checkpoint": (["--checkpoint={empty}"], r"not an lm_jax training"),
    "random_dir_as_hf_dir": (["--hf_dir={empty}"], r"config\.json' not found"),
    "two_sources": (["--checkpoint={empty}", "--gguf={bad.gguf}"], r"exactly one of"),
    "bad_flag_value": (["--checkpoint={empty}", "--top_p=abc"], r"--top_p=abc"),
    "bad_sampling_value": (["--checkpoint={empty}", "--temperature=-1"], r"--temperature"),
    "bad_lookahead": (
        ["--checkpoint={empty}", "--speculative=ngram", "--lookahead=0"], r"--lookahead must be"
    ),
    "bad_num_beams": (["--checkpoint={empty}", "--num_beams=0"], r"--num_beams must be >= 1"),
    "bad_prefill_chunk": (["--checkpoint={empty}", "--prefill_chunk=-1"], r"--prefill_chunk must"),
    "beams_and_speculative": (
        ["--checkpoint={empty}", "--num_beams=2", "--speculative=ngram"], r"choose one"
    ),
}


@pytest.mark.parametrize("case", sorted(GENERATE))
def test_generate(case, base, files):
    args, pattern = GENERATE[case]
    one_error_line(binary("generate", *_fmt(args, files, base)), pattern)


# ---------------------------------------------------------------- evaluate

EVALUATE = {
    "missing_checkpoint": ([f"--checkpoint={MISSING}"], r"does not exist"),
    "missing_corpus": (
        ["--checkpoint={base}", "--data_source=file:/nonexistent/corpus.txt"],
        r"no such file",
    ),
    "missing_sst2": (["--checkpoint={base}", "--task=sst2", "--data_dir={empty}"], r"not found"),
    "malformed_sst2": (
        ["--checkpoint={base}", "--task=sst2", "--data_dir={sst2}"],
        r"stsa\.binary\.test:1: SST-2 lines",
    ),
    "malformed_gguf": (["--gguf={bad.gguf}"], r"not a readable GGUF"),
    "adapters_as_checkpoint": (["--checkpoint={adapters}"], r"holds LoRA adapters"),
    "no_adapters_in_folder": (
        ["--checkpoint={base}", "--adapters={empty}"], r"holds no LoRA adapters.*trained with LoRA"
    ),
    "image_text_as_checkpoint": (["--checkpoint={image_text}"], r"image-text workdir"),
    "unknown_task": (["--checkpoint={empty}", "--task=nope"], r"unknown task 'nope'"),
    "bad_flag_value": (["--checkpoint={empty}", "--limit=abc"], r"--limit=abc"),
}


@pytest.mark.parametrize("case", sorted(EVALUATE))
def test_evaluate(case, base, files):
    args, pattern = EVALUATE[case]
    one_error_line(binary("evaluate", *_fmt(args, files, base)), pattern)


# ---------------------------------------------------------------- warm children = cold processes

COLD = {
    "generate": GENERATE["missing_checkpoint"][0],
    "pretrain": ["--preset=tiny", "--train.mesh=data:3", "--train.workdir={tmp}/w"],
    "finetune": ["--train_file={bad.jsonl}", "--train.workdir={tmp}/w"],
}


@pytest.mark.parametrize("name", sorted(COLD))
def test_a_warm_child_behaves_as_a_cold_process(name, files, tmp_path):
    args = _fmt([a.replace("{tmp}", str(tmp_path)) for a in COLD[name]], files)
    warm, cold = binary(name, *args), cold_binary(name, *args)
    assert one_error_line(warm, ".") == one_error_line(cold, ".")  # both exit 2


def test_verify_unknown_check():
    one_error_line(binary("verify", "--checks=attention,bogus"), r"unknown \['bogus'\]; choose")
