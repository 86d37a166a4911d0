"""The project's error types, on the ground floor: exception classes only, this module imports
nothing from lm_jax.

`UserError` and its kinds mean "bad input": binaries (lm_jax.cli) print them as one `error:` line
and exit 2. The modules that raise them re-export them (`lm_jax.configs.ConfigError`,
`lm_jax.sharding.MeshError`, `lm_jax.checkpoint.CheckpointMismatch`, ...).
"""


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class MeshError(UserError, ValueError):
    """The requested mesh does not fit the devices."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be restored; the message says which and what to do."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint was saved for a different model (a leaf's shape or presence differs):
    no older step can help, so restore_latest raises it at once."""


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, no permission); earlier checkpoints are untouched."""


class AdapterCheckpointError(ConfigError):
    """An adapter checkpoint is missing, malformed, or used as a full-model checkpoint."""


class DataSourceError(ConfigError):
    """A data source spec is malformed or names nothing (a ConfigError: --data.source is a
    config value)."""


class TokenizerError(UserError, ValueError):
    """A tokenizer cannot be built, loaded or used on this text."""


class FaultSpecError(UserError, ValueError):
    """LM_JAX_FAULTS is malformed."""


class EncoderInputError(UserError, ValueError):
    """Encoder inputs do not fit the model: rank, length (max_position_embeddings), masks,
    token types."""


class EvalError(UserError, ValueError):
    """An evaluation cannot run on this model or data."""


# What the binaries report as one line (exit 2) rather than a traceback.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
