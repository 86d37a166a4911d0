"""lm_jax/cli.py and lm_jax/configs/flags.py in process: optional nested configs, string lists,
config subsets, deprecated spellings, and ConfigErrors that name the flag."""

import dataclasses

import pytest
from absl import flags

from lm_jax import cli
from lm_jax.configs.flags import apply_config_flags, define_config_flags
from lm_jax.configs.lora import LoraConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.errors import USER_ERRORS, ConfigError, UserError
from lm_jax.train.finetune import FinetuneConfig


def parse(fv, *args):
    fv(["prog", *args])
    return fv


def test_optional_nested_config_switch_and_string_lists():
    fv = flags.FlagValues()
    define_config_flags("finetune", FinetuneConfig, fv)
    base = FinetuneConfig(lora=LoraConfig(rank=8))
    got = apply_config_flags("finetune", base, parse(fv, "--finetune.lora.targets=a,b$"))
    assert got.lora.targets == ("a", "b$") and got.lora.rank == 8
    fv = parse(flags.FlagValues(), *[])
    define_config_flags("finetune", FinetuneConfig, fv)
    assert apply_config_flags("finetune", base, parse(fv, "--nofinetune.lora")).lora is None
    fv = flags.FlagValues()
    define_config_flags("finetune", FinetuneConfig, fv)
    assert apply_config_flags("finetune", FinetuneConfig(), parse(fv, "--finetune.lora")).lora == (
        LoraConfig()
    )
    fv = flags.FlagValues()
    define_config_flags("finetune", FinetuneConfig, fv)
    with pytest.raises(ConfigError, match="drop --finetune.lora.rank"):
        apply_config_flags(
            "finetune", base, parse(fv, "--nofinetune.lora", "--finetune.lora.rank=4")
        )


def test_a_config_subset_defines_only_those_flags():
    fv = flags.FlagValues()
    define_config_flags("train", TrainConfig, fv, fields={"steps", "mesh"})
    assert {n for n in fv if n.startswith("train.")} == {"train.steps", "train.mesh"}
    got = apply_config_flags("train", TrainConfig(), parse(fv, "--train.steps=7"))
    assert got == TrainConfig(steps=7)


@pytest.fixture
def fresh(monkeypatch):
    fv = flags.FlagValues()
    monkeypatch.setattr(cli, "FLAGS", fv)
    monkeypatch.setattr(cli, "_DEPRECATED", {})
    return fv


def test_config_errors_name_the_flag(fresh):
    cli.define_config("train", TrainConfig)
    parse(fresh, "--train.steps=0")
    with pytest.raises(ConfigError, match=r"steps must be > 0.*\(set by --train\.steps\)"):
        cli.config("train", TrainConfig())


def test_deprecated_spellings_are_rewritten_with_a_warning(fresh, capsys):
    cli.define_config("train", TrainConfig, fields=("steps", "learning_rate"))
    cli.deprecate("steps", "train.steps")
    cli.deprecate("lr", "train.learning_rate")
    to_lora = lambda v: ["--nofinetune.lora"] if v == "0" else [f"--finetune.lora.rank={v}"]  # noqa: E731
    cli.deprecate("lora_rank", "finetune.lora.rank", to_lora)
    argv = ["p", "--steps=3", "--lr", "0.5", "--lora_rank=0", "--other=1", "--", "--steps=9"]
    assert cli._rewrite_deprecated(argv) == [
        "p", "--train.steps=3", "--train.learning_rate", "0.5", "--nofinetune.lora",
        "--other=1", "--", "--steps=9",
    ]  # fmt: skip
    assert cli._rewrite_deprecated(["p", "--lora_rank", "4"])[1:] == ["--finetune.lora.rank=4"]
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 4 and all(w.startswith("warning: --") for w in warnings)
    assert "use --train.learning_rate" in warnings[1]


def test_user_errors_are_one_family():
    from lm_jax.checkpoint import CheckpointError, CheckpointWriteError
    from lm_jax.configs import ConfigError as ReExported
    from lm_jax.data.sources import DataSourceError
    from lm_jax.data.tokenizer import TokenizerError
    from lm_jax.sharding import MeshError

    assert ReExported is ConfigError
    for cls in (CheckpointError, CheckpointWriteError, DataSourceError, TokenizerError, MeshError):
        assert issubclass(cls, UserError) and issubclass(cls, USER_ERRORS)
    assert issubclass(ConfigError, ValueError)  # `except ValueError` callers keep working
    assert dataclasses.is_dataclass(TrainConfig)
