"""The exceptions that mean "bad input": binaries print them as one line and exit 2."""

from lm_jax.checkpoint import CheckpointError
from lm_jax.configs.base import ConfigError
from lm_jax.data.tokenizer import TokenizerError
from lm_jax.faults import FaultSpecError
from lm_jax.sharding import MeshError

USER_ERRORS = (
    ConfigError,
    TokenizerError,
    MeshError,
    CheckpointError,
    FaultSpecError,
    FileNotFoundError,
)
