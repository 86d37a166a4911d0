"""Denoising inputs: BERT's MLM masking rates (15% selected; 80/10/10) within 4 standard errors
on 200k tokens, specials never selected; T5 span corruption's exact noise and span counts, and
inputs + targets that rebuild the original sequence."""

import numpy as np

from lm_jax.data.denoising import IGNORE, mlm_mask, noise_mask, span_corruption


def test_mlm_rates_and_labels():
    rng = np.random.default_rng(0)
    V, MASK, CLS, SEP = 1000, 103, 101, 102
    ids = rng.integers(200, V, (400, 500))
    ids[:, 0], ids[:, -1] = CLS, SEP
    out, labels = mlm_mask(ids, rng, mask_id=MASK, vocab_size=V, special_ids=(CLS, SEP, 0))
    sel = labels != IGNORE
    assert not sel[:, 0].any() and not sel[:, -1].any()
    np.testing.assert_array_equal(labels[sel], ids[sel])
    n = ids[:, 1:-1].size
    p = sel.sum() / n

    def close(x, q, m):
        assert abs(x - q) < 4 * np.sqrt(q * (1 - q) / m), (x, q)

    close(p, 0.15, n)
    k = sel.sum()
    close((out[sel] == MASK).mean(), 0.8, k)
    unchanged = out[sel] == ids[sel]
    close(unchanged.mean(), 0.1 + 0.1 / V, k)  # kept, or a random draw of the same id
    np.testing.assert_array_equal(out[~sel], ids[~sel])


def test_noise_mask_counts_and_shape():
    rng = np.random.default_rng(1)
    for L in (10, 37, 100, 512):
        for _ in range(20):
            m = noise_mask(L, rng, 0.15, 3.0)
            n_noise = min(max(int(np.round(L * 0.15)), 1), L - 1)
            assert m.sum() == n_noise and not m[0]
            starts = np.sum(m[1:] & ~m[:-1])
            assert starts == max(int(np.round(n_noise / 3.0)), 1)


def test_span_corruption_rebuilds_the_sequence():
    rng = np.random.default_rng(2)
    V, EOS = 32100, 1
    for L in (8, 50, 200):
        ids = rng.integers(2, 32000, L).tolist()
        inp, tgt = span_corruption(ids, rng, sentinel_start=V - 1, eos_id=EOS)
        assert inp[-1] == EOS and tgt[-1] == EOS
        sentinels = [t for t in inp if t >= 32000]
        assert sentinels == list(range(V - 1, V - 1 - len(sentinels), -1))
        # fill each sentinel of the input with the span after it in the target
        spans, cur = {}, None
        for t in tgt[:-1]:
            if t >= 32000:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [x for t in inp[:-1] for x in (spans[t] if t >= 32000 else [t])]
        assert rebuilt == ids
        assert sum(len(s) for s in spans.values()) == int(np.round(L * 0.15))
