r"""Run first on new hardware: kernels, dispatch modes, loss chunking, sharding and checkpoint
layouts against their references on the devices JAX finds, as one table (lm_jax/verify.py).

python experiments/verify.py                      # every check on the default backend
python experiments/verify.py --checks=attention,sharded
XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python experiments/verify.py

Exits 0 when every check passes (or cannot run here: `skip`, with the reason), 1 otherwise.
"""

from __future__ import annotations

import sys

from absl import flags

from lm_jax import cli

flags.DEFINE_list("checks", [], "Checks to run (default: all); see lm_jax/verify.py.")
flags.DEFINE_string("out", None, "Also write the table to this markdown file.")
FLAGS = flags.FLAGS


def main(argv):
    from lm_jax.errors import ConfigError
    from lm_jax.verify import CHECKS, run_checks, table

    unknown = [c for c in FLAGS.checks if c not in CHECKS]
    if unknown:
        raise ConfigError(f"--checks: unknown {unknown}; choose from {list(CHECKS)}")
    checks = run_checks(FLAGS.checks or None)
    text = table(checks)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    print(f"\nall {len(checks)} checks passed ({sum(bool(c.skipped) for c in checks)} skipped)")


if __name__ == "__main__":
    cli.run(main)
