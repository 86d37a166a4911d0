"""The project's error types, on the ground floor: this module imports nothing from lm_jax.

Each is re-exported by the module that raises it (e.g. `lm_jax.configs.base.ConfigError`).
`USER_ERRORS` are the exceptions that mean "bad input": binaries print them as one line and exit 2.
"""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupt, or does not fit the model."""


class DataSourceError(ValueError):
    """A data source is missing, empty or malformed; the message names it and the fix."""


class MeshError(ValueError):
    """The requested mesh does not fit the devices."""


class FaultSpecError(ValueError):
    """`LM_JAX_FAULTS` names an unknown fault or gives a value that is not a number."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored; the message says which and what to do."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint was saved for a different model (a leaf's shape or presence differs):
    no older step can help, so restore_latest raises it at once."""


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, no permission); earlier checkpoints are untouched."""


class AdapterCheckpointError(ConfigError):
    """An adapter checkpoint is missing, malformed, or used as a full-model checkpoint."""


USER_ERRORS = (
    ConfigError,
    TokenizerError,
    MeshError,
    CheckpointError,
    FaultSpecError,
    FileNotFoundError,
)
