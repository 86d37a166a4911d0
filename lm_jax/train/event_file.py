"""TensorBoard scalar event files, written directly (no TensorFlow, tensorboardX or torch).

Importing tensorboardX pulls in torch when it is installed (about 3 s a process); a scalar log
needs none of it. An event file is a sequence of TFRecords
(`uint64 length | masked crc32c(length) | data | masked crc32c(data)`, little-endian), each
`data` one serialized `tensorflow.Event` proto:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

The encoding below writes those fields in field-number order, as protobuf's serializer does, so a
record equals `event_pb2.Event(...).SerializeToString()` for the same values (the test checks it
against tensorboardX's protos and crc32c).
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord frame around `data`."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float,
    step: int = 0,
    *,
    file_version: str | None = None,
    scalars: dict[str, float] | None = None,
) -> bytes:
    """A serialized Event: either the file-version header or one Summary of scalar values."""
    out = bytearray(_varint(1 << 3 | 1) + struct.pack("<d", wall_time))
    if step:
        out += _varint(2 << 3 | 0) + _varint(int(step))
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars is not None:
        summary = b"".join(
            _field_bytes(
                1,
                _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value),
            )
            for tag, value in scalars.items()
        )
        out += _field_bytes(5, summary)
    return bytes(out)


class ScalarEventWriter:
    """Appends scalar summaries to `logdir/events.out.tfevents.<time>.<host>`, flushed per call."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")  # noqa: SIM115  (closed in close())
        self._f.write(tfrecord(encode_event(now, file_version="brain.Event:2")))
        self._f.flush()

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """One event holding every `tag: value` of this step."""
        if scalars:
            self._f.write(tfrecord(encode_event(time.time(), step, scalars=scalars)))
            self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
