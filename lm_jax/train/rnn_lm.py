"""Truncated-BPTT training of the LSTM LM (`lm_jax.nn.lstm`) on one token stream, as a `Task`
of the one loop (`lm_jax.train.engine.run`: checkpoints, exact resume, SIGTERM, metrics).

The training stream is cut into `batch_size` contiguous columns [B, N // B]; update k reads the
window j = k mod E of epoch k div E (E = (N // B - 1) // num_steps windows an epoch), so every
batch is a function of the step index and nothing but the state needs saving. The LSTM state
is part of the train state: it carries from window to window and is reset to zeros at the
start of each epoch, so a resumed run continues with the very state it stopped with.

Evaluation runs a split as one sequence (batch 1, the state carried throughout, in chunks of
`eval_chunk` tokens), with one `<eos>` before its first token so every token is predicted:
perplexity = exp(total NLL / tokens), tokens = words + one `<eos>` per sentence.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm_jax.configs.lstm import BPTTConfig, LSTMConfig
from lm_jax.errors import ConfigError
from lm_jax.losses import token_log_probs
from lm_jax.nn.lstm import LSTMLM, zero_carry
from lm_jax.train.engine import Task
from lm_jax.train.loop import params_hash

EOS = "<eos>"


@flax.struct.dataclass
class RNNTrainState:
    """step, params, the LSTM state carried between windows, skipped (non-finite) steps."""

    step: jax.Array
    params: Any
    carry: Any
    skipped: jax.Array


def word_vocab(lines: Sequence[str]) -> dict[str, int]:
    """Word -> id over `lines` plus `<eos>`, most frequent first (ties alphabetical)."""
    counts = Counter(w for ln in lines for w in ln.split() + [EOS])
    return {w: i for i, (w, _) in enumerate(sorted(counts.items(), key=lambda x: (-x[1], x[0])))}


def word_stream(lines: Sequence[str], vocab: dict[str, int]) -> np.ndarray:
    """Ids of every word with `<eos>` after each line [N] int32; unknown words are an error."""
    ids = []
    for ln in lines:
        for w in ln.split() + [EOS]:
            if w not in vocab:
                raise ConfigError(f"word {w!r} is not in the vocabulary (map it to <unk> first)")
            ids.append(vocab[w])
    return np.asarray(ids, np.int32)


def token_nll(params, cfg: LSTMConfig, x, y, carry, rng=None):
    """(NLL [B, T] of y given x and the carried state, new state)."""
    train = rng is not None
    logits, new = LSTMLM(cfg).apply(
        {"params": params}, x, carry, deterministic=not train,
        rngs={"dropout": rng} if train else None,
    )  # fmt: skip
    return -token_log_probs(logits, y), new


@functools.lru_cache(maxsize=8)
def train_step_fn(cfg: LSTMConfig, grad_clip: float):
    """jit(step): (state, x [B, T], y [B, T], reset, lr, rng) -> (state, metrics).

    The loss is the window's NLL summed over time and averaged over the batch (Zaremba et
    al.'s cost); plain SGD after global-norm clipping. A non-finite step leaves the state as it
    was (the loop's policy decides whether to go on)."""

    def step(state: RNNTrainState, x, y, reset, lr, rng):
        carry = jax.tree.map(lambda c: jnp.where(reset, jnp.zeros_like(c), c), state.carry)

        def loss(p):
            nll, new = token_nll(p, cfg, x, y, carry, rng if cfg.dropout > 0 else None)
            return jnp.sum(jnp.mean(nll, axis=0)), new

        (cost, new), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        gnorm = optax.tree.norm(grads)
        scale = jnp.minimum(1.0, grad_clip / jnp.maximum(gnorm, 1e-12)) if grad_clip else 1.0
        params = jax.tree.map(lambda p, g: p - lr * scale * g, state.params, grads)
        finite = jnp.isfinite(cost) & jnp.isfinite(gnorm)
        keep = lambda a, b: jax.tree.map(lambda u, v: jnp.where(finite, u, v), a, b)  # noqa: E731
        new_state = RNNTrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            carry=keep(jax.lax.stop_gradient(new), carry),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        T = x.shape[1]
        metrics = {"loss": cost / T, "grad_norm": gnorm, "lr": lr, "finite": finite}
        metrics["tokens"] = jnp.asarray(x.size, jnp.float32)
        return new_state, metrics

    return jax.jit(step)


@functools.lru_cache(maxsize=8)
def _eval_chunk_fn(cfg: LSTMConfig):
    def f(params, x, y, mask, carry):
        nll, new = token_nll(params, cfg, x, y, carry)
        return jnp.sum(nll * mask), new

    return jax.jit(f)


def stream_nll(params, cfg: LSTMConfig, ids: np.ndarray, start: int, chunk: int = 2048):
    """(total NLL, tokens) of `ids` [N] read as one sequence after the token `start`."""
    seq = np.concatenate([[start], ids]).astype(np.int32)
    fn, carry, total = _eval_chunk_fn(cfg), zero_carry(cfg, 1), 0.0
    n = len(seq) - 1
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x, y = np.zeros((1, chunk), np.int32), np.zeros((1, chunk), np.int32)
        mask = np.zeros((1, chunk), np.float32)
        x[0, :m], y[0, :m], mask[0, :m] = seq[s : s + m], seq[s + 1 : s + m + 1], 1.0
        nll, carry = fn(params, x, y, mask, carry)  # padding comes last: its state is unused
        total += float(nll)
    return total, n


class BPTTTask(Task):
    """The LSTM LM on a token stream by truncated BPTT (module docstring); `splits` maps
    evaluation split names to id streams ("valid" is evaluated periodically, all at the end)."""

    def __init__(
        self, cfg: LSTMConfig, bptt: BPTTConfig, train_ids, splits: dict, eos_id: int,
        seed: int = 0, eval_chunk: int = 2048,
    ):  # fmt: skip
        self.cfg, self.bptt, self.seed, self.eos_id = cfg, bptt, seed, eos_id
        B, T = bptt.batch_size, bptt.num_steps
        cols = len(train_ids) // B
        self.epoch_steps = (cols - 1) // T
        if self.epoch_steps < 1:
            raise ConfigError(
                f"{len(train_ids)} training tokens make no window of {T} steps in {B} columns: "
                "lower batch_size or num_steps"
            )
        self.data = np.asarray(train_ids[: B * cols], np.int32).reshape(B, cols)
        self.splits, self.eval_chunk = splits, eval_chunk
        self._step = train_step_fn(cfg, float(bptt.grad_clip))

    @property
    def total_steps(self) -> int:
        return self.bptt.epochs * self.epoch_steps

    def init_state(self):
        x = jnp.zeros((1, 2), jnp.int32)
        params = LSTMLM(self.cfg).init(jax.random.key(self.seed), x, zero_carry(self.cfg, 1))
        return RNNTrainState(
            step=jnp.zeros((), jnp.int32), params=params["params"],
            carry=zero_carry(self.cfg, self.bptt.batch_size), skipped=jnp.zeros((), jnp.int32),
        )  # fmt: skip

    def meta(self) -> dict:
        return {"lstm": dataclasses.asdict(self.cfg), "bptt": dataclasses.asdict(self.bptt)}

    def describe(self, state) -> str:
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
        return f"LSTM LM {n / 1e6:.2f}M params, {self.epoch_steps} windows an epoch"

    def train_step(self, state, step: int):
        epoch, j = divmod(step, self.epoch_steps)
        T = self.bptt.num_steps
        x = self.data[:, j * T : (j + 1) * T]
        y = self.data[:, j * T + 1 : (j + 1) * T + 1]
        lr = jnp.float32(self.bptt.learning_rate_at(epoch))
        rng = jax.random.fold_in(jax.random.key(self.seed + 1), step)
        return self._step(state, x, y, jnp.bool_(j == 0), lr, rng)

    def step_record(self, step: int, metrics: dict, state) -> dict:
        return {
            "step": step, "loss_hex": float(metrics["loss"]).hex(),
            "window": (step - 1) % self.epoch_steps, "params_hash": params_hash(state.params),
            "carry_hash": params_hash(state.carry),
        }  # fmt: skip

    def _perplexity(self, state, names) -> dict:
        out = {}
        for name in names:
            nll, n = stream_nll(state.params, self.cfg, self.splits[name], self.eos_id,
                                self.eval_chunk)  # fmt: skip
            out[f"{name}_ppl"] = float(np.exp(nll / n))
            out[f"{name}_tokens"] = n
        return out

    def evaluate(self, state, step: int) -> dict:
        return self._perplexity(state, [k for k in self.splits if k == "valid"])

    def final_evaluate(self, state, step: int) -> dict:
        return self._perplexity(state, list(self.splits))
