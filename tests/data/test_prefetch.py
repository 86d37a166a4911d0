"""Prefetcher: the same batches in the same order as the wrapped iterator, `get_state` after
the last batch handed out (not the ones read ahead), exact rewind on close / set_state, and
errors from the iterator raised in the consumer."""

import pytest

from lm_jax.data.prefetch import Prefetcher


class Counter:
    """A resumable iterator of ints; fails on `fail_at`."""

    def __init__(self, fail_at=None):
        self.i, self.fail_at = 0, fail_at

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.fail_at:
            raise ValueError(f"bad row {self.i}")
        self.i += 1
        return self.i - 1

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def test_order_state_and_rewind():
    p = Prefetcher(Counter(), transform=lambda x: x * 10, depth=3)
    got = [next(p) for _ in range(5)]
    assert got == [(10 * i, i) for i in range(5)]
    assert p.get_state() == {"i": 5}  # the thread has read ahead; the state has not
    p.close()
    assert p.it.get_state() == {"i": 5}  # rewound to what was handed out
    assert next(p) == (50, 5)
    p.set_state({"i": 2})
    assert [next(p)[1] for _ in range(3)] == [2, 3, 4] and p.get_state() == {"i": 5}
    p.close()


def test_errors_reach_the_consumer():
    p = Prefetcher(Counter(fail_at=3))
    assert [next(p)[1] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad row 3"):
        next(p)
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(Counter(), depth=0)
