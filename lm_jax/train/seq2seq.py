"""Sequence-to-sequence training of a T5-family encoder-decoder (`lm_jax.nn.t5.T5`) on
(source, target) pairs, as a `Task` of the one loop (checkpoints, exact resume, SIGTERM, the
non-finite policy, metrics); translation quality by beam search and sacrebleu.

Pairs are token ids: source + [EOS] into the encoder; the decoder reads [start] + target and
predicts target + [EOS]. Loss: label-smoothed cross entropy (`losses.label_smoothed_nll`)
averaged over the target tokens of the batch. Batches are a function of the step index (as in
`lm_jax.train.tagging`: per-epoch seeded permutation, length-sorted pools, shuffled batches),
padded up the geometric length ladder. Evaluation: the validation loss (periodic) and, at the
end, beam-search translations of every evaluation split scored by BLEU / chrF (sacrebleu).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.beam_search import seq2seq_beam_search
from lm_jax.checkpoint import read_meta, restore_params
from lm_jax.configs.seq2seq import Seq2SeqConfig
from lm_jax.configs.t5 import T5Config
from lm_jax.configs.train import TrainConfig
from lm_jax.data.tokenizer import load_tokenizer
from lm_jax.errors import CheckpointError, ConfigError, DataSourceError
from lm_jax.eval.generation_metrics import generation_report
from lm_jax.losses import label_smoothed_nll
from lm_jax.nn.t5 import T5, abstract_params
from lm_jax.train.example_task import ExampleTask
from lm_jax.utils import length_bucket

BATCH_KEYS = ("source", "source_mask", "target_in", "target_out", "target_mask")


def encode_pairs(tokenizer, sources: Sequence[str], targets: Sequence[str], eos: int,
                 max_source: int, max_target: int, what: str = "train"):  # fmt: skip
    """[(source ids + EOS, target ids + EOS)]; a pair past the limits is a one-line error."""
    if len(sources) != len(targets):
        raise DataSourceError(
            f"{what}: {len(sources)} source lines but {len(targets)} target lines; the files "
            "must be line-aligned"
        )
    out = []
    for i, (s, t) in enumerate(zip(sources, targets)):
        a, b = list(tokenizer.encode(s)) + [eos], list(tokenizer.encode(t)) + [eos]
        if len(a) > max_source or len(b) > max_target:
            raise DataSourceError(
                f"{what} pair {i}: {len(a)} source / {len(b)} target tokens, past "
                f"max_source_len={max_source} / max_target_len={max_target}; raise them "
                "(--seq2seq.max_source_len) or drop the pair"
            )
        out.append((np.asarray(a, np.int32), np.asarray(b, np.int32)))
    return out


def collate(pairs, batch_size: int, start: int, pad: int) -> dict:
    """Padded [batch_size, S] / [batch_size, T] arrays (filler rows empty but for one key)."""
    S = length_bucket(max(len(a) for a, _ in pairs), minimum=8)
    T = length_bucket(max(len(b) for _, b in pairs), minimum=8)
    out = {
        "source": np.full((batch_size, S), pad, np.int32),
        "source_mask": np.zeros((batch_size, S), np.int32),
        "target_in": np.full((batch_size, T), pad, np.int32),
        "target_out": np.full((batch_size, T), pad, np.int32),
        "target_mask": np.zeros((batch_size, T), np.int32),
    }
    for j, (a, b) in enumerate(pairs):
        out["source"][j, : len(a)], out["source_mask"][j, : len(a)] = a, 1
        out["target_in"][j, 0], out["target_in"][j, 1 : len(b)] = start, b[:-1]
        out["target_out"][j, : len(b)], out["target_mask"][j, : len(b)] = b, 1
    out["source_mask"][len(pairs) :, 0] = 1
    return out


def loss_fn(params, batch, cfg: T5Config, smoothing: float, rng=None):
    model = T5(cfg, deterministic=rng is None)
    logits = model.apply(
        {"params": params}, batch["source"], batch["target_in"], batch["source_mask"],
        rngs=None if rng is None else {"dropout": rng},
    )  # fmt: skip
    mask = batch["target_mask"]
    loss_sum, nll_sum, n = label_smoothed_nll(logits, batch["target_out"], mask, smoothing)
    n = jnp.maximum(n, 1.0)
    return loss_sum / n, {"loss": loss_sum / n, "nll": nll_sum / n, "tokens": n}


@functools.lru_cache(maxsize=8)
def _eval_loss_fn(cfg: T5Config, smoothing: float):
    return jax.jit(lambda p, b: loss_fn(p, b, cfg, smoothing)[1])


def translate(cfg: T5Config, s2s: Seq2SeqConfig, params, tokenizer, sources: Sequence[str],
              mesh, decode: Callable | None = None) -> list[str]:  # fmt: skip
    """Beam-search translations of `sources` (length-sorted batches of `s2s.eval_batch_size`)."""
    decode = decode or tokenizer.decode
    eos, B = cfg.eos_token_id, s2s.eval_batch_size
    enc = [list(tokenizer.encode(x)) + [eos] for x in sources]
    for i, e in enumerate(enc):
        if len(e) > s2s.max_source_len:
            raise DataSourceError(
                f"source {i} has {len(e)} tokens (EOS included), past max_source_len="
                f"{s2s.max_source_len}: shorten it or raise --seq2seq.max_source_len"
            )
    order = np.argsort([len(e) for e in enc], kind="stable")
    out: list[str] = [""] * len(enc)
    for i in range(0, len(order), B):
        rows = order[i : i + B]
        S = length_bucket(max(len(enc[r]) for r in rows), minimum=8)
        src = np.full((B, S), cfg.pad_token_id, np.int32)
        mask = np.zeros_like(src)
        for j, r in enumerate(rows):
            src[j, : len(enc[r])], mask[j, : len(enc[r])] = enc[r], 1
        mask[len(rows) :, 0] = 1
        with jax.set_mesh(mesh):
            res = seq2seq_beam_search(cfg, params, src, s2s.max_new_tokens, s2s.num_beams,
                                      s2s.length_penalty, source_mask=mask)  # fmt: skip
        toks, lens = np.asarray(res.tokens), np.asarray(res.lengths)
        for j, r in enumerate(rows):
            out[r] = decode([t for t in toks[j, : lens[j]].tolist() if t != eos])
    return out


def load_seq2seq(workdir: str, mesh):
    """(T5Config, Seq2SeqConfig, params, tokenizer) from a train_seq2seq workdir (newest step)."""
    step, meta = read_meta(workdir)
    if "seq2seq" not in meta:
        raise CheckpointError(f"{workdir!r} holds no seq2seq run (experiments/train_seq2seq.py)")
    cfg = T5Config.from_dict(meta["seq2seq"]["t5"])
    s2s = Seq2SeqConfig(**meta["seq2seq"]["config"])
    params = restore_params(workdir, step, abstract_params(cfg), mesh)
    return cfg, s2s, params, load_tokenizer(os.path.join(workdir, "tokenizer"))


def evaluate_translation(workdir: str, sources, references, mesh, **overrides) -> dict:
    """BLEU / chrF (sacrebleu) of a seq2seq workdir's beam-search translations; `overrides`
    replace Seq2SeqConfig decoding fields (num_beams, length_penalty, eval_batch_size, ...)."""
    cfg, s2s, params, tokenizer = load_seq2seq(workdir, mesh)
    s2s = dataclasses.replace(s2s, **{k: v for k, v in overrides.items() if v is not None})
    hyps = translate(cfg, s2s, params, tokenizer, sources, mesh)
    rep = generation_report(hyps, list(references))
    return {
        "n": len(hyps), **rep, "num_beams": s2s.num_beams, "length_penalty": s2s.length_penalty,
        "examples": list(zip(sources[:3], hyps[:3])),
    }  # fmt: skip


class Seq2SeqTask(ExampleTask):
    """`train`: encoded pairs (`encode_pairs`); `evals`: {split: (source texts, reference
    texts)}; `decode(ids) -> text` turns generated ids back into text for BLEU."""

    def __init__(self, cfg: T5Config, s2s: Seq2SeqConfig, train_cfg: TrainConfig, tokenizer,
                 train, evals: dict, mesh, decode: Callable | None = None):  # fmt: skip
        if s2s.max_new_tokens > cfg.model.max_len:
            raise ConfigError(
                f"seq2seq.max_new_tokens={s2s.max_new_tokens} is past the decoder cache of "
                f"t5.model.max_len={cfg.model.max_len}: lower it or raise --t5.model.max_len"
            )
        self.cfg, self.s2s = cfg, s2s
        self.tokenizer, self.train, self.evals = tokenizer, train, evals
        self.decode = decode or (lambda ids: tokenizer.decode(ids))
        loss = lambda p, b, r: loss_fn(p, b, cfg, s2s.label_smoothing, r)  # noqa: E731
        self.setup(abstract_params(cfg), loss, BATCH_KEYS, [len(a) + len(b) for a, b in train],
                   s2s.batch_size, s2s.pool_batches, train_cfg, mesh)  # fmt: skip
        self._valid = None

    def init_params(self, rng, given):
        x = jnp.zeros((1, 4), jnp.int32)
        return nn.unbox(T5(self.cfg).init(rng, x, x)["params"])

    def collate(self, indices) -> dict:
        return collate([self.train[i] for i in indices], self.s2s.batch_size,
                       self.cfg.decoder_start_token_id, self.cfg.pad_token_id)  # fmt: skip

    def meta(self) -> dict:
        return {"seq2seq": {"t5": self.cfg.to_dict(), "config": dataclasses.asdict(self.s2s)}}

    def describe(self, state) -> str:
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
        return (f"T5 encoder-decoder {n / 1e6:.1f}M params, {len(self.train)} pairs, "
                f"{self.epoch_steps} batches an epoch")  # fmt: skip

    def valid_loss(self, state, pairs) -> dict:
        """Token-weighted label-smoothed loss and NLL (perplexity) over `pairs`."""
        fn, B = _eval_loss_fn(self.cfg, self.s2s.label_smoothing), self.s2s.eval_batch_size
        tot = {"loss": 0.0, "nll": 0.0, "tokens": 0.0}
        order = np.argsort([len(b) for _, b in pairs], kind="stable")
        for s in range(0, len(order), B):
            chunk = [pairs[i] for i in order[s : s + B]]
            b = collate(chunk, B, self.cfg.decoder_start_token_id, self.cfg.pad_token_id)
            with jax.set_mesh(self.mesh):
                m = jax.device_get(fn(state.params, b))
            n = float(m["tokens"])
            tot["loss"] += float(m["loss"]) * n
            tot["nll"] += float(m["nll"]) * n
            tot["tokens"] += n
        n = max(tot["tokens"], 1.0)
        return {"loss": tot["loss"] / n, "ppl": float(np.exp(tot["nll"] / n))}

    def translate(self, state, sources: Sequence[str]) -> list[str]:
        return translate(self.cfg, self.s2s, state.params, self.tokenizer, sources, self.mesh,
                         self.decode)  # fmt: skip

    def evaluate(self, state, step: int) -> dict:
        if "val" not in self.evals:
            return {}
        if self._valid is None:
            src, ref = self.evals["val"]
            self._valid = encode_pairs(self.tokenizer, src, ref, self.cfg.eos_token_id,
                                       10**6, 10**6, "val")  # fmt: skip
        return {f"val_{k}": v for k, v in self.valid_loss(state, self._valid).items()}

    def final_evaluate(self, state, step: int) -> dict:
        out = self.evaluate(state, step)
        for name, (src, ref) in self.evals.items():
            n = self.s2s.eval_limit or len(src)
            hyps = self.translate(state, src[:n])
            rep = generation_report(hyps, list(ref[:n]))
            out.update({f"{name}_{k}": v for k, v in rep.items() if k in ("bleu", "chrf")})
            out[f"{name}_sentences"] = float(n)
            self.examples = list(zip(src[:3], hyps[:3], ref[:3]))
        return out
