"""Preference optimisation (DPO, IPO, SimPO) of a decoder LM, full or LoRA, on the one loop.

`posttrain(...)` encodes the pairs (`lm_jax.train.preference_data`), computes the reference
log-probs once, and runs a `PreferenceTask` through `lm_jax.train.engine.run` (restore, the
non-finite policy, metrics, saves, SIGTERM, exact resume). Method 'sft' is supervised
fine-tuning on the chosen completions through the existing `SFTTask`
(`lm_jax.train.finetune.finetune`).

The reference. DPO and IPO compare the policy with the model it starts from: before the first
step every pair's chosen and rejected rows are scored once by `lm_jax.scoring.Scorer` under the
initial policy (the base with zero-effect LoRA factors, or the base itself), and the numbers
ride along in every batch. They are cached in `workdir/reference_logps.npz` with a fingerprint
of (model config, initial params, every pair's tokens, seq_len): a resumed run (or a rerun with
the same inputs) loads them instead of scoring again, and a stale cache is recomputed. With
`save=False` nothing is cached. SimPO needs no reference.

Checkpoints are the fine-tuning ones (`lm_jax.train.tuning`): LoRA saves the adapters and their
optimizer state only (plus `workdir/adapters` every save); full training the whole model plus
`workdir/tokenizer`, so `lm_jax.checkpoint.load_model(workdir)` loads it.

Metrics: train/{loss, accuracy, reward_chosen, reward_rejected, reward_margin, logp_chosen,
logp_rejected, grad_norm}; eval/ the same on the held-out pairs (all of them, or
`eval_examples`) every `eval_every` steps and at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from lm_jax.checkpoint import meta_dict
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.losses_preference import PairLogps, needs_reference
from lm_jax.scoring import Scorer
from lm_jax.sharding import make_mesh
from lm_jax.train import finetune as ft_lib
from lm_jax.train.loop import params_hash
from lm_jax.train.preference_data import (
    EncodedPair,
    PreferenceBatches,
    PreferenceConfig,
    PreferencePair,
    encode_pair,
    read_preference_jsonl,
    text_pairs,
)
from lm_jax.train.preference_step import (
    batch_shardings,
    jit_train_step,
    pair_metrics,
    score_pairs,
)
from lm_jax.train.sft_data import Example
from lm_jax.train.tuning import (
    TunedModelTask,
    check_batching,
    check_model,
    prepare_model,
    run_tuning,
)

REFERENCE_FILE = "reference_logps.npz"


# --------------------------------------------------------------------------- the reference


def _hash_pairs(h, encoded: Sequence[EncodedPair]) -> None:
    for e in encoded:
        for ids, n_prompt in (e.chosen, e.rejected):
            h.update(np.asarray([n_prompt, len(ids)], np.int64).tobytes() + ids.tobytes())


def pairs_fingerprint(encoded: Sequence[EncodedPair]) -> str:
    """sha256 of every row's tokens (16 hex digits): which pairs a run trains on."""
    h = hashlib.sha256(str(len(encoded)).encode())
    _hash_pairs(h, encoded)
    return h.hexdigest()[:16]


def reference_fingerprint(cfg: ModelConfig, params, sets: dict, seq_len: int) -> str:
    """sha256 of what the reference log-probs depend on: the model, its initial params and
    every row's tokens (16 hex digits)."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(params_hash(params).encode())
    h.update(str(seq_len).encode())
    for name in sorted(sets):
        h.update(f"{name}:{len(sets[name])}".encode())
        _hash_pairs(h, sets[name])
    return h.hexdigest()[:16]


def _load_cache(path: str, fingerprint: str, sets: dict):
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return {n: (z[f"{n}_chosen"], z[f"{n}_rejected"]) for n in sets}
    except (OSError, KeyError, ValueError):  # unreadable or partial: score again
        return None


def reference_logps(
    cfg: ModelConfig, params, sets: dict[str, Sequence[EncodedPair]], pcfg: PreferenceConfig,
    mesh, workdir: str | None = None, log: Callable[[str], None] = print,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:  # fmt: skip
    """({set name: (chosen [N], rejected [N]) float64}, fingerprint): each pair's summed
    completion log-probs under (`cfg`, `params`), scored by the one scorer, or read from
    `workdir/reference_logps.npz` when its fingerprint matches (`workdir` None: no cache)."""
    fp = reference_fingerprint(cfg, params, sets, pcfg.seq_len)
    path = os.path.join(workdir, REFERENCE_FILE) if workdir else None
    cached = _load_cache(path, fp, sets) if path else None
    if cached is not None:
        log(f"reference log-probs: read from {path} (fingerprint {fp})")
        return cached, fp
    t0 = time.perf_counter()
    scorer = Scorer(cfg, params, mesh)
    out = {}
    with jax.set_mesh(mesh):
        for name, enc in sets.items():
            s = score_pairs(scorer, enc, pcfg.seq_len, pcfg.eval_batch_size)
            out[name] = (s.chosen, s.rejected)
    n = sum(len(e) for e in sets.values())
    log(f"reference log-probs: {n} pairs scored in {time.perf_counter() - t0:.1f}s")
    if path and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            arrays = {f"{k}_{side}": v[i] for k, v in out.items()
                      for i, side in enumerate(("chosen", "rejected"))}  # fmt: skip
            np.savez(f, fingerprint=np.asarray(fp), **arrays)
        os.replace(tmp, path)  # atomic: a kill mid-write leaves no partial cache
    return out, fp


# --------------------------------------------------------------------------- the task


class PreferenceTask(TunedModelTask):
    """DPO / IPO / SimPO (full or LoRA) as a task of the one loop; `refs` / `refs_eval`:
    (chosen [N], rejected [N]) reference log-probs of the pairs (None for SimPO)."""

    def __init__(self, cfg, params, trainable, enc, train_cfg, pcfg: PreferenceConfig, *, mesh,
                 refs=None, enc_eval=(), refs_eval=None, fingerprint=None, base_name=None,
                 log=print):  # fmt: skip
        super().__init__(cfg, params, trainable, train_cfg, pcfg, mesh=mesh,
                         base_name=base_name, log=log)  # fmt: skip
        self.pcfg, self.fingerprint = pcfg, fingerprint
        self.enc_eval, self.refs_eval = list(enc_eval), refs_eval
        self.bsh = batch_shardings(mesh, pcfg.batch_size, refs is not None)
        self.step_fn = jit_train_step(cfg, train_cfg, pcfg, self.tx, self.shardings, self.bsh,
                                      trainable=trainable)  # fmt: skip
        self.data = PreferenceBatches(enc, pcfg, train_cfg.seed, refs)

    def meta(self) -> dict:
        """Configs for the resume check: the pairs are the data stream (other pairs, seq_len
        or seed: the saved iterator position would point elsewhere, so a resume is refused)."""
        p = self.pcfg
        data = {"source": f"pairs:{pairs_fingerprint(self.data.encoded)}", "seq_len": p.seq_len,
                "seed": self.train_cfg.seed}  # fmt: skip
        extra = {"posttrain": p.to_dict(), "base": self.base_name, "reference": self.fingerprint}
        return meta_dict(self.cfg, self.train_cfg, data, extra)

    def put(self, batch: dict):
        return jax.device_put(batch, self.bsh)

    def describe(self, state) -> str:
        p = self.pcfg
        extra = f", gamma {p.gamma_}" if p.method == "simpo" else ""
        return f"{p.method}: beta {p.beta_}{extra}, {len(self.data.encoded)} pairs"

    def evaluate(self, state, step: int) -> dict:
        if not self.enc_eval:
            return {}
        p = self.pcfg
        with jax.set_mesh(self.mesh):
            scorer = Scorer(self.cfg, state.params, self.mesh)
            policy = score_pairs(scorer, self.enc_eval, p.seq_len, p.eval_batch_size)
        ref = None
        if self.refs_eval is not None:
            ref = PairLogps(*self.refs_eval, policy.chosen_counts, policy.rejected_counts)
        return {f"eval/{k}": v for k, v in pair_metrics(p, policy, ref).items()}

    def final_evaluate(self, state, step: int) -> dict:
        out = self.evaluate(state, step)
        self.export_peft(state)
        return out


# --------------------------------------------------------------------------- entry points


def _sft(base_cfg, params, tokenizer, pairs, eval_pairs, train_cfg, pcfg, **kw) -> dict:
    chosen = lambda ps: [Example(p.prompt, p.chosen) for p in ps]  # noqa: E731
    ft = pcfg.finetune_config()
    out = ft_lib.finetune(base_cfg, params, tokenizer, chosen(pairs), train_cfg, ft,
                          eval_examples=chosen(eval_pairs), **kw)  # fmt: skip
    return {**out, "method": "sft"}


def posttrain(
    base_cfg: ModelConfig,
    params,
    tokenizer,
    pairs: Sequence[PreferencePair | EncodedPair],
    train_cfg: TrainConfig,
    pcfg: PreferenceConfig,
    *,
    eval_pairs: Sequence[PreferencePair | EncodedPair] = (),
    base_name: str | None = None,
    mesh=None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train (or resume in `train_cfg.workdir`) `pcfg.method` on `pairs` (text pairs, or pairs
    already encoded: `EncodedPair`, e.g. `sampled_pairs.rank_token_pairs`) through the one loop;
    returns {model_config, params, state, stats, history, final, resumed_from, method}."""
    mesh = make_mesh(train_cfg.mesh) if mesh is None else mesh
    eval_pairs = list(eval_pairs)[: pcfg.eval_examples or None]
    if pcfg.method == "sft":
        return _sft(base_cfg, params, tokenizer, pairs, eval_pairs, train_cfg, pcfg,
                    base_name=base_name, mesh=mesh, log=log)  # fmt: skip
    check_batching(mesh, train_cfg, pcfg.batch_size, pcfg.eval_batch_size, pcfg.seq_len,
                   base_cfg.max_len)  # fmt: skip
    cfg, params, trainable = prepare_model(base_cfg, params, pcfg, train_cfg.seed)
    enc, enc_eval = ([p if isinstance(p, EncodedPair)
                      else encode_pair(tokenizer, p, pcfg.seq_len, pcfg.add_eos) for p in ps]
                     for ps in (pairs, eval_pairs))  # fmt: skip
    for e in enc + enc_eval:
        if max(len(e.chosen[0]), len(e.rejected[0])) > pcfg.seq_len + 1:
            raise ConfigError(f"an encoded pair is longer than seq_len + 1 = {pcfg.seq_len + 1} "
                              "tokens: raise seq_len.")  # fmt: skip
    cut = sum(e.truncated for e in enc + enc_eval)
    if cut:
        log(f"{cut} of {len(enc) + len(enc_eval)} pairs truncated to fit seq_len {pcfg.seq_len}")
    refs = refs_eval = fp = None
    if needs_reference(pcfg.method):
        workdir = train_cfg.workdir if pcfg.save else None
        sets = {"train": enc, "eval": enc_eval}
        got, fp = reference_logps(cfg, params, sets, pcfg, mesh, workdir, log)
        refs, refs_eval = got["train"], got["eval"]
    task = PreferenceTask(cfg, params, trainable, enc, train_cfg, pcfg, mesh=mesh, refs=refs,
                          enc_eval=enc_eval, refs_eval=refs_eval, fingerprint=fp,
                          base_name=base_name, log=log)  # fmt: skip
    del params
    _, out = run_tuning(task, cfg, tokenizer, train_cfg, pcfg, len(enc), log)
    return {**out, "method": pcfg.method}


def load_pairs(train_file: str = "", eval_file: str = "", source: str = "shakespeare",
               train_limit: int | None = None, eval_limit: int = 128, seed: int = 0):  # fmt: skip
    """(train pairs, eval pairs): JSONL files, or pairs made from text `source`
    (`text_pairs`; 512 train pairs unless `train_limit`, `eval_limit` held-out ones)."""
    if train_file:
        train = read_preference_jsonl(train_file)[:train_limit]
    else:
        train = text_pairs(source, "train", train_limit or 512, seed)
    if eval_file:
        held_out = read_preference_jsonl(eval_file)[: eval_limit or None]
    elif train_file or not eval_limit:
        held_out = []
    else:
        held_out = text_pairs(source, "validation", eval_limit, seed)
    return train, held_out


def run(
    *,
    checkpoint: str = "",
    hf_dir: str = "",
    gguf: str = "",
    train_file: str = "",
    eval_file: str = "",
    pairs_source: str = "shakespeare",
    train_limit: int | None = None,
    eval_limit: int = 128,
    pcfg: PreferenceConfig,
    train_cfg: TrainConfig,
    log: Callable[[str], None] = print,
) -> dict:
    """The post-training binary: model loading (default SmolLM2-135M-Instruct), data, `posttrain`;
    returns its report."""
    if not (checkpoint or hf_dir or gguf):
        gguf = ft_lib.default_gguf()
    cfg, params, tok, name = ft_lib.load_source(checkpoint, hf_dir, gguf)
    check_model(cfg, params, pcfg)  # LoRA targets, before anything compiles
    train, held_out = load_pairs(train_file, eval_file, pairs_source, train_limit, eval_limit,
                                 train_cfg.seed)  # fmt: skip
    log(f"model {name}: {cfg.num_layers} layers, d_model {cfg.d_model}; {len(train)} pairs, "
        f"{len(held_out)} held out")  # fmt: skip
    out = posttrain(cfg, params, tok, train, train_cfg, pcfg, eval_pairs=held_out,
                    base_name=name, log=log)  # fmt: skip
    data = train_file or f"pairs from {pairs_source}"
    return {"method": pcfg.method, "data": data, "model": name, **out["stats"], **out["final"]}
