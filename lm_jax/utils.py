"""Small helpers shared across layers (imports nothing from lm_jax)."""


def round_up(n: int, m: int) -> int:
    """The smallest multiple of `m` that is >= n."""
    return -(-n // m) * m


def length_bucket(n: int, minimum: int = 16, per_octave: int = 4) -> int:
    """A padded length >= n from a geometric ladder: `minimum`, then `per_octave` evenly spaced
    steps in each doubling (4: ... 128, 160, 192, 224, 256, ...), so a stream of lengths
    compiles O(log) shapes and wastes at most 1 / per_octave of each padded row."""
    if n <= minimum:
        return minimum
    top = minimum
    while top < n:
        top *= 2
    return min(round_up(n, max(top // (2 * per_octave), 1)), top)
