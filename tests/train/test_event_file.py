"""TensorBoard event files written without tensorboardX, read back with tensorboardX's own protos
and CRC-32C (the reference)."""

import math
import struct

import numpy as np
from tensorboardX.crc32c import crc32c as reference_crc32c
from tensorboardX.proto import event_pb2, summary_pb2

from lm_jax.train.event_file import crc32c, encode_event, tfrecord
from lm_jax.train.metrics import MetricWriter


def read_records(path) -> list[bytes]:
    """TFRecord frames, every length and data checksum verified with the reference crc32c."""

    def masked(b):
        c = reference_crc32c(b)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    data, out, i = open(path, "rb").read(), [], 0
    while i < len(data):
        (n,) = struct.unpack_from("<Q", data, i)
        assert struct.unpack_from("<I", data, i + 8)[0] == masked(data[i : i + 8])
        payload = data[i + 12 : i + 12 + n]
        assert struct.unpack_from("<I", data, i + 12 + n)[0] == masked(payload)
        out.append(payload)
        i += 16 + n
    return out


def test_crc32c_matches_the_reference_and_the_published_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 64, 1000):
        b = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(b) == reference_crc32c(b)


def test_events_serialize_exactly_as_protobuf_does():
    header = event_pb2.Event(wall_time=1764748800.25, file_version="brain.Event:2")
    assert encode_event(1764748800.25, file_version="brain.Event:2") == header.SerializeToString()
    values = {"train/loss": 2.5, "train/zero": 0.0, "eval/neg": -1.5e-7, "ünï/côdé": 3.0}
    for step in (1, 127, 128, 2**40):
        want = event_pb2.Event(
            wall_time=12.5,
            step=step,
            summary=summary_pb2.Summary(
                value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
            ),
        )
        assert encode_event(12.5, step, scalars=values) == want.SerializeToString(), step
    assert len(tfrecord(b"")) == 16


def test_metric_writer_logs_every_scalar_and_vector_entry_to_tensorboard(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write(3, {"loss": np.float32(1.25), "expert_load": np.array([0.5, 0.25, 0.25])}, "train/")
    w.write(4, {"loss": float("nan")}, "train/")
    w.close()
    (path,) = (tmp_path / "tensorboard").iterdir()
    assert "tfevents" in path.name
    events = [event_pb2.Event.FromString(r) for r in read_records(path)]
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert got[:4] == [
        (3, "train/loss", 1.25),
        (3, "train/expert_load/0", 0.5),
        (3, "train/expert_load/1", 0.25),
        (3, "train/expert_load/2", 0.25),
    ]
    assert got[4][:2] == (4, "train/loss") and math.isnan(got[4][2])
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
