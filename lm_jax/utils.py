"""Small helpers shared across layers (imports nothing from lm_jax)."""


def round_up(n: int, m: int) -> int:
    """The smallest multiple of `m` that is >= n."""
    return -(-n // m) * m
