r"""Pretrain a decoder LM from a preset, with any config field overridden by a flag.

  python experiments/pretrain.py                         # the default preset on Shakespeare
  python experiments/pretrain.py --preset=tiny --train.steps=20 --train.workdir=/tmp/run
  python experiments/pretrain.py --preset=llama_small --train.mesh=data:2,fsdp:2,tensor:2

Rerunning the same command resumes from the newest checkpoint in --train.workdir.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from lm_jax.configs.flags import apply_config_flags, define_config_flags
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

    define_config_flags("model", ModelConfig)
    define_config_flags("data", DataConfig)
    define_config_flags("train", TrainConfig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments {argv[1:]}; flags look like --x=y")
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
        model=apply_config_flags("model", model),
        data=apply_config_flags("data", DataConfig(**data_overrides)),
        train=apply_config_flags("train", train_cfg),
        vocab_from_tokenizer=not F["model.vocab_size"].present,
        debug_nonfinite_step=F.debug_nonfinite_step,
        debug_nonfinite_count=F.debug_nonfinite_count,
    )
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
    try:
        app.run(main)
    except Exception as e:  # a clear one-line error for bad input, not only a traceback
        from lm_jax.errors import USER_ERRORS
        from lm_jax.train.loop import TrainingHalted

        if isinstance(e, USER_ERRORS):
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, TrainingHalted):  # the non-finite policy stopped the run (exit 3)
            print(f"halted: {e}", file=sys.stderr)
            sys.exit(3)
        raise
