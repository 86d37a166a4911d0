"""lm_jax's GGUF reader (lm_jax/convert/gguf_file.py) against the PyPI `gguf` package's
GGUFReader: every metadata value, tensor name, shape, type and byte equal, on a file written
with gguf's GGUFWriter (every value type, quantized and float tensors) and on the real
SmolLM2-135M Q4_1 file; bad files are one-line errors."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lm_jax.convert.gguf import from_gguf, smollm2_gguf_path  # noqa: E402
from lm_jax.convert.gguf_file import GGUFFile, GGUFFormatError  # noqa: E402
from lm_jax.errors import ConfigError  # noqa: E402


def assert_same_as_gguf_reader(path):
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert list(ours.metadata) == [k for k in ref.fields if not k.startswith("GGUF.")]
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):  # the reader's own header pseudo-fields
            assert ours.metadata[key] == field.contents(), key
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        o = ours.tensors[t.name]
        assert o.shape == tuple(int(s) for s in t.shape), t.name
        assert o.tensor_type == int(t.tensor_type), t.name
        assert o.data.tobytes() == np.ascontiguousarray(t.data).tobytes(), t.name
        a = gguf.quants.dequantize(o.data, o.tensor_type)
        b = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(np.reshape(a, -1), np.reshape(b, -1))
    return ours


def test_every_value_type_and_tensor_type_reads_as_gguf_reader_does(tmp_path):
    path = str(tmp_path / "all.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁wörld")
    w.add_array("t.strs", ["a", "", "▁b", "日本"] * 50)
    w.add_array("t.ints", list(range(-3, 300)))
    w.add_array("t.floats", [0.5, -1.25, 3.0])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.normal(size=(3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.normal(size=(2, 4, 8)).astype(np.float16))
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        x = rng.normal(size=(4, 64)).astype(np.float32)
        q = gguf.quants.quantize(x, qtype)
        w.add_tensor(qtype.name, q, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = assert_same_as_gguf_reader(path)
    assert ours.metadata["t.strs"][:4] == ["a", "", "▁b", "日本"]
    assert ours.tensors["Q8_0"].shape == (64, 4)


def test_smollm2_file_reads_as_gguf_reader_does():
    ours = assert_same_as_gguf_reader(smollm2_gguf_path())
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152


def test_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(GGUFFormatError, match="magic"):
        GGUFFile(str(bad))
    good = open(smollm2_gguf_path(), "rb").read(16 << 20)  # the whole header and some tensors
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[:200_000])
    with pytest.raises(GGUFFormatError, match="truncated or corrupt"):
        GGUFFile(str(cut))
    cut.write_bytes(good)  # whole header, tensor data missing
    with pytest.raises(ConfigError, match="runs past the end of the file"):
        from_gguf(str(cut))
