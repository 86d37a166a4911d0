"""Resuming checks the saved config: a different model function or data stream is refused with
a one-line CheckpointMismatch; train-config and execution-only changes are allowed and listed."""

import dataclasses

import pytest

from lm_jax.checkpoint import CheckpointMismatch, check_resume_config, config_changes, meta_dict
from lm_jax.configs.base import MoEConfig, gpt2_style
from lm_jax.configs.train import TrainConfig
from lm_jax.data import DataConfig

MODEL = gpt2_style(d_model=32, num_layers=2, num_heads=4, max_len=64)
DATA = DataConfig(seq_len=32, batch_size=4)
TRAIN = TrainConfig(steps=10)


def meta(model=MODEL, train=TRAIN, data=DATA):
    return meta_dict(model, train, data)


def test_identical_configs_resume_silently():
    assert check_resume_config(5, "/w", meta(), meta()) == []


def test_nested_configs_compare_field_by_field():
    a = meta(MODEL.replace(moe=MoEConfig(num_experts=4, top_k=2)))
    b = meta(MODEL.replace(moe=MoEConfig(num_experts=4, top_k=1)))
    assert config_changes(a["model"], b["model"]) == [("moe.top_k", 2, 1)]
    assert config_changes(meta()["model"], a["model"])[0][0].startswith("moe")


def test_a_different_activation_is_refused_naming_field_values_and_fix():
    with pytest.raises(CheckpointMismatch) as e:
        check_resume_config(5, "/w/checkpoints", meta(), meta(MODEL.replace(activation="relu")))
    msg = str(e.value)
    assert "step 5 in /w/checkpoints" in msg
    assert "model.activation (saved 'gelu_tanh', now 'relu')" in msg
    assert "new --train.workdir" in msg


def test_a_different_data_stream_is_refused():
    with pytest.raises(CheckpointMismatch, match=r"data\.seed \(saved 0, now 3\).*repeat or skip"):
        check_resume_config(5, "/w", meta(), meta(data=dataclasses.replace(DATA, seed=3)))


def test_train_and_execution_changes_are_allowed_and_listed():
    notes = check_resume_config(
        5,
        "/w",
        meta(),
        meta(
            model=MODEL.replace(remat="full", attention_q_block=0),
            train=TRAIN.replace(steps=20, mesh="data:2"),
            data=DataConfig(seq_len=32, batch_size=4, num_workers=2),
        ),
    )
    assert "train.steps: 10 -> 20" in notes
    assert "train.mesh: '' -> 'data:2'" in notes
    assert "model.remat: 'none' -> 'full'" in notes
    assert "model.attention_q_block: 64 -> 0" in notes
    assert "data.num_workers: 0 -> 2" in notes


def test_checkpoints_without_saved_configs_are_not_checked():
    assert check_resume_config(5, "/w", {}, meta(MODEL.replace(activation="relu"))) == []


def test_a_meta_saved_before_the_qwen_gemma_switches_still_resumes():
    """Model fields added later (issue 20) take the value the older maths implies."""
    from lm_jax.configs.base import RopeScaling
    from lm_jax.resume_config import ADDED_MODEL_FIELDS

    model = MODEL.replace(rope_scaling=RopeScaling())
    old = meta(model)
    for k in ADDED_MODEL_FIELDS:
        head, _, tail = k.partition(".")
        (old["model"][head] if tail else old["model"]).pop(tail or head)
    assert check_resume_config(5, "/w", old, meta(model)) == []
    with pytest.raises(CheckpointMismatch, match="model.attn_softcap"):
        check_resume_config(5, "/w", old, meta(model.replace(attn_softcap=30.0)))


def test_another_optimizer_is_refused_and_older_metas_read_as_adamw():
    with pytest.raises(CheckpointMismatch, match=r"another optimizer: train\.optimizer \(saved "
                       r"'adamw', now 'adafactor'\)"):  # fmt: skip
        check_resume_config(5, "/w", meta(), meta(train=TRAIN.replace(optimizer="adafactor")))
    old = meta()
    del old["train"]["optimizer"]  # a checkpoint written before the field
    assert check_resume_config(5, "/w", old, meta()) == []
    with pytest.raises(CheckpointMismatch, match="another optimizer"):
        check_resume_config(5, "/w", old, meta(train=TRAIN.replace(optimizer="adafactor")))
