"""The side-by-side suite reads every variant `benchmarks.moe_step` prints."""

from benchmarks.run_all import parse_moe_step

OUT = """\
dense                              step    117.7 ms      8703 tokens/s  ratio to dense  1.00x
dropless:ragged_dot                step    380.9 ms      2689 tokens/s  ratio to dense  3.24x
dropless:block_padded@128          step    152.3 ms      6723 tokens/s  fast path in 92%
dropless:block_padded@128/nofast   step    181.0 ms      5657 tokens/s  ratio to dense  1.54x
capacity                           step    151.7 ms      6750 tokens/s  ratio to dense  1.29x
"""


def test_every_moe_variant_is_parsed():
    got = parse_moe_step("compiling...\n" + OUT)
    assert got == {
        "moe dense ms/step": 117.7,
        "moe dropless:ragged_dot ms/step": 380.9,
        "moe dropless:block_padded@128 ms/step": 152.3,
        "moe dropless:block_padded@128/nofast ms/step": 181.0,
        "moe capacity ms/step": 151.7,
    }
