"""Packing documents into rows for the streaming pipeline: `Packer` (documents -> rows of T
tokens, a document longer than the rest of its row continuing in the next), `make_row`,
and `quotas` (each mixture source's exact share of a batch's rows)."""

from __future__ import annotations

import numpy as np

from lm_jax.data.lazy_sources import BATCH_KEYS


class Packer:
    """Rows of T + 1 tokens over a DocStream (concat-then-split), resumable exactly."""

    def __init__(self, docs, tokenizer, seq_len: int, pad_id: int):  # docs: a DocStream
        self.docs, self.tok, self.T, self.pad = docs, tokenizer, seq_len, int(pad_id)
        self.eos = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id], np.int32)
        self.buf: list[list] = []  # [position, example id, tokens, seq] from the row start
        self.offset = 0  # tokens of buf[0] before the next row's start
        self.seq = 0  # running document number (piece boundaries)
        self.done = False
        self.bytes = 0  # UTF-8 bytes of the documents pulled

    def _pull(self) -> bool:
        while True:
            nxt = self.docs.next()
            if nxt is None:
                self.done = True
                return False
            pos, ex, text = nxt
            toks = np.asarray(self.tok.encode_array(text), np.int32)
            if self.eos is not None:
                toks = np.concatenate([toks, self.eos])
            self.bytes += len(text.encode("utf-8"))
            if toks.size:
                self.seq += 1
                self.buf.append([pos, ex, toks, self.seq])
                return True

    def _have(self) -> int:
        return sum(b[2].size for b in self.buf) - self.offset

    def row(self) -> dict | None:
        """The next row (batch dict entries without the batch axis), None when the stream ended."""
        T = self.T
        while self._have() < T + 1 and not self.done:
            self._pull()
        n = min(self._have(), T + 1)
        if n <= 0:
            return None
        toks, own, seq = [], [], []
        need, off = n, self.offset
        for _, ex, t, s in self.buf:
            piece = t[off : off + need]
            off = 0
            toks.append(piece)
            own.append(np.full(piece.size, ex, np.int32))
            seq.append(np.full(piece.size, s, np.int64))
            need -= piece.size
            if need == 0:
                break
        tok, own, seq = np.concatenate(toks), np.concatenate(own), np.concatenate(seq)
        row = make_row(tok, own, seq, T, self.pad)
        self._advance(min(T, n))
        if n <= T:  # the stream ended inside this row: nothing left to start another
            self.buf, self.offset = [], 0
        return row

    def _advance(self, m: int) -> None:
        self.offset += m
        while self.buf and self.offset >= self.buf[0][2].size:
            self.offset -= self.buf[0][2].size
            self.buf.pop(0)

    def get_state(self) -> dict:
        if self.buf:
            return {"doc": list(self.buf[0][0]), "offset": int(self.offset), "done": False}
        return {"doc": list(self.docs.position), "offset": 0, "done": self.done}

    def set_state(self, state: dict) -> None:
        self.buf, self.offset, self.seq, self.done = [], 0, 0, bool(state.get("done", False))
        self.docs.seek(state["doc"])
        if not self.done and int(state["offset"]):
            self._pull()
            self.offset = int(state["offset"])


def make_row(tok, own, seq, T: int, pad_id: int) -> dict[str, np.ndarray]:
    """Batch-dict row from up to T + 1 stream tokens (owner ids and document numbers)."""
    n = tok.size
    j = np.arange(T)
    valid = j < min(n, T)
    nxt = j + 1 < n
    tokp = np.full(T + 1, pad_id, np.int32)
    tokp[:n] = tok
    seqp = np.full(T + 1, -1, np.int64)
    seqp[:n] = seq
    ownp = np.full(T + 1, -1, np.int32)
    ownp[:n] = own
    in_seq = seqp[:-1]
    start = np.ones(T, bool)
    start[1:] = in_seq[1:] != in_seq[:-1]
    first = np.maximum.accumulate(np.where(start, j, 0))
    return {
        "inputs": np.where(valid, tokp[:-1], pad_id).astype(np.int32),
        "targets": np.where(valid & nxt, tokp[1:], pad_id).astype(np.int32),
        "positions": np.where(valid, j - first, 0).astype(np.int32),
        "segment_ids": np.where(valid, np.cumsum(start), 0).astype(np.int32),
        "loss_mask": (valid & nxt & (seqp[1:] == in_seq)).astype(np.float32),
        "example_ids": np.where(valid, ownp[:-1], -1).astype(np.int32),
    }


def _pad_row(T: int, pad_id: int) -> dict[str, np.ndarray]:
    e = np.zeros(0, np.int32)
    return make_row(e, e, e.astype(np.int64), T, pad_id)


def _stack(rows) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def quotas(weights, k: int, rows: int) -> np.ndarray:
    """Rows of each source in batch k: differences of floor(cumulative share * rows so far)."""
    cw = np.cumsum(np.asarray(weights, np.float64))
    cw = cw / cw[-1]

    def upto(b):
        c = np.floor(cw * b * rows + 1e-9).astype(np.int64)
        c[-1] = b * rows
        return np.diff(np.r_[0, c])

    return upto(k + 1) - upto(k)
