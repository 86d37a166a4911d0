r"""Pretrain a decoder LM from a preset, with any config field overridden by a flag.

  python experiments/pretrain.py                         # the default preset on Shakespeare
  python experiments/pretrain.py --preset=tiny --train.steps=20 --train.workdir=/tmp/run
  python experiments/pretrain.py --preset=llama_small --train.mesh=data:2,fsdp:2,tensor:2

Rerunning the same command resumes from the newest checkpoint in --train.workdir.
"""

from __future__ import annotations

from absl import flags, logging

from lm_jax import cli
from lm_jax.configs.presets import PRESETS, get_preset

flags.DEFINE_enum("preset", "default", sorted(PRESETS), "Configuration preset.")
flags.DEFINE_bool("eval_only", False, "Evaluate the newest checkpoint in --train.workdir and exit.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
flags.DEFINE_integer("debug_nonfinite_step", -1, "Fault injection: NaN loss at this step.")
flags.DEFINE_integer(
    "debug_nonfinite_count", 1, "Fault injection: this many bad steps from debug_nonfinite_step."
)


def _define():
    from lm_jax.configs.base import ModelConfig
    from lm_jax.configs.train import TrainConfig
    from lm_jax.data import DataConfig

    cli.define_config("model", ModelConfig)
    cli.define_config("data", DataConfig)
    cli.define_config("train", TrainConfig)


def check_workdir(workdir: str) -> None:
    """A --train.workdir holding another kind of run is refused (it would be mixed in)."""
    import os

    from lm_jax.checkpoint import KIND_NAMES, CheckpointError, workdir_kind

    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise CheckpointError(f"--train.workdir={workdir} is a file; give a folder")
    kind = workdir_kind(workdir)  # LoRA runs have checkpoints/ too: look at what else is there
    if kind is not None:
        raise CheckpointError(
            f"--train.workdir={workdir} holds {KIND_NAMES[kind]}, not a pretraining run; "
            "give the run a folder of its own"
        )


def main(argv):
    F = flags.FLAGS
    if not F["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if F.coordinator_address:
        import jax

        jax.distributed.initialize(F.coordinator_address, F.num_processes, F.process_id)
    from lm_jax.data import DataConfig
    from lm_jax.train.loop import Experiment, evaluate_checkpoint, print_samples, train

    model, data_overrides, train_cfg = get_preset(F.preset)
    exp = Experiment(
        model=cli.config("model", model),
        data=cli.config("data", DataConfig(**data_overrides)),
        train=cli.config("train", train_cfg),
        vocab_from_tokenizer=not cli.is_set("model.vocab_size"),
        debug_nonfinite_step=F.debug_nonfinite_step,
        debug_nonfinite_count=F.debug_nonfinite_count,
    )
    check_workdir(exp.train.workdir)
    if F.eval_only:
        print(evaluate_checkpoint(exp))
        return 0
    result = train(exp)
    if result["finished"]:
        ev = result["eval"]
        print(
            f"validation loss {ev['loss']:.4f} | perplexity {ev['perplexity']:.2f}"
            + (f" | bits per byte {ev['bits_per_byte']:.4f}" if "bits_per_byte" in ev else "")
        )
        print_samples(result, exp)
    return 0


if __name__ == "__main__":
    _define()
    cli.run(main)
