"""Image-text training and evaluation: sharded state, pure jitted steps, zero-shot / retrieval /
captioning metrics.

Batches are dicts of `image` uint8 [B, H, W, C] (scaled to [-1, 1] inside the step), `tokens`
int32 [B, T] and `mask` bool [B, T]; the batch axis is sharded over the data-parallel mesh
axes, so the contrastive loss sees the global batch (XLA gathers the embeddings it needs).
Captioning batches hold BOS + caption (`tokens`, `mask`); targets are the tokens shifted left.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import textwrap
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lm_jax.configs.base import ModelConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.data.scenes import encode_texts
from lm_jax.eval.generation_metrics import bleu, rouge
from lm_jax.losses import cross_entropy
from lm_jax.losses_contrastive import contrastive_loss
from lm_jax.nn.two_towers import Captioner, CaptionerConfig, TextConfig, TwoTowerConfig, TwoTowers
from lm_jax.nn.vision import VisionConfig
from lm_jax.sharding import batch_sharding, params_shardings
from lm_jax.train import engine
from lm_jax.train.engine import Task
from lm_jax.train.loop import params_hash
from lm_jax.train.state import TrainState, opt_state_shardings


def _dummy(cfg):
    v = cfg.vision
    images = jnp.zeros((1, v.image_size, v.image_size, v.channels), jnp.float32)
    return images, jnp.zeros((1, 4), jnp.int32)


def model_of(cfg):
    return TwoTowers(cfg) if isinstance(cfg, TwoTowerConfig) else Captioner(cfg)


def init_state(cfg: TwoTowerConfig | CaptionerConfig, tx, mesh, seed: int = 0):
    """(TrainState initialised directly into its shardings, TrainState of shardings)."""
    model = model_of(cfg)
    init = lambda r: model.init(r, *_dummy(cfg))["params"]  # noqa: E731
    boxed = jax.eval_shape(init, jax.random.key(seed))
    p_sh = params_shardings(boxed, mesh)
    params = nn.unbox(boxed)
    o_sh = opt_state_shardings(jax.eval_shape(tx.init, params), params, p_sh, mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    sh = TrainState(step=rep, params=p_sh, opt_state=o_sh, skipped=rep)

    def make(rng):
        p = nn.unbox(init(rng))
        z = jnp.zeros((), jnp.int32)
        return TrainState(step=z, params=p, opt_state=tx.init(p), skipped=z)

    return jax.jit(make, out_shardings=sh)(jax.random.key(seed)), sh


def to_unit(images):
    """uint8 pixels -> float32 in [-1, 1] (identity for float input)."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images


def contrastive_loss_fn(params, batch, cfg: TwoTowerConfig, rng=None, train=False):
    out = TwoTowers(cfg).apply(
        {"params": params}, to_unit(batch["image"]), batch["tokens"], batch["mask"],
        deterministic=not train, rngs=None if rng is None else {"dropout": rng},
    )  # fmt: skip
    loss = contrastive_loss(out, cfg.loss)
    sims = out["image_embeds"] @ out["text_embeds"].T  # [B, B]
    acc = jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0]))
    return loss, {"loss": loss, "logit_scale": out["logit_scale"], "batch_i2t_acc": acc}


def caption_loss_fn(params, batch, cfg: CaptionerConfig, rng=None, train=False):
    tokens, mask = batch["tokens"], batch["mask"]
    logits = Captioner(cfg).apply(
        {"params": params}, to_unit(batch["image"]), tokens[:, :-1],
        deterministic=not train, rngs=None if rng is None else {"dropout": rng},
    )  # fmt: skip
    nll, _, count = cross_entropy(logits, tokens[:, 1:], mask[:, 1:])
    loss = nll / jnp.maximum(count, 1.0)
    return loss, {"loss": loss, "tokens": count}


def train_step(state: TrainState, batch, rng, *, cfg, tx):
    """One optimizer step; CLIP's clamp of the temperature parameter after the update."""
    fn = contrastive_loss_fn if isinstance(cfg, TwoTowerConfig) else caption_loss_fn
    rng = jax.random.fold_in(rng, state.step)
    grads, metrics = jax.grad(fn, has_aux=True)(state.params, batch, cfg, rng, True)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if isinstance(cfg, TwoTowerConfig):  # logit_scale <= log(max_logit_scale), as CLIP
        params = dict(params)
        params["logit_scale"] = jnp.minimum(params["logit_scale"], math.log(cfg.max_logit_scale))
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    new = TrainState(state.step + 1, params, opt_state, state.skipped)
    return new, metrics


def jit_train_step(cfg, tx, state_sh, mesh, image_ndim: int = 4):
    batch_sh = {
        "image": batch_sharding(mesh, image_ndim),
        "tokens": batch_sharding(mesh, 2),
        "mask": batch_sharding(mesh, 2),
    }
    fn = functools.partial(train_step, cfg=cfg, tx=tx)
    return jax.jit(
        fn, in_shardings=(state_sh, batch_sh, None), out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )  # fmt: skip


def device_batch(batch: dict) -> dict:
    return {k: batch[k] for k in ("image", "tokens", "mask")}


# --------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=8)
def _encoders(cfg: TwoTowerConfig):
    m = TwoTowers(cfg)
    img = jax.jit(lambda p, x: m.apply({"params": p}, to_unit(x), method=TwoTowers.encode_image))
    txt = jax.jit(
        lambda p, t, k: m.apply({"params": p}, t, k, method=TwoTowers.encode_text)
    )  # fmt: skip
    return img, txt


def embed_images(cfg: TwoTowerConfig, params, images, batch_size: int = 256) -> np.ndarray:
    """uint8 [N, H, W, C] -> normalised embeddings [N, E]."""
    f, _ = _encoders(cfg)
    return np.concatenate(
        [
            np.asarray(f(params, images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
    )


def embed_texts(cfg: TwoTowerConfig, params, tokens, mask, batch_size: int = 512) -> np.ndarray:
    _, f = _encoders(cfg)
    out = [
        np.asarray(f(params, tokens[i : i + batch_size], mask[i : i + batch_size]))
        for i in range(0, len(tokens), batch_size)
    ]
    return np.concatenate(out)


def zero_shot_classifier(cfg, params, tok, class_names: Sequence[str], templates: Sequence[str]):
    """Class embeddings [K, E]: the normalised mean over prompt templates (CLIP's ensembling)."""
    texts = [t.format(cls=c) for c in class_names for t in templates]
    tokens, mask = encode_texts(tok, texts, cfg.text.model.max_len)
    emb = embed_texts(cfg, params, tokens, mask).reshape(len(class_names), len(templates), -1)
    emb = emb.mean(1)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def zero_shot_accuracy(cfg, params, tok, images, labels, class_names, templates) -> float:
    """Top-1 accuracy of argmax_k image . class_k over uint8 images [N, H, W, C]."""
    cls = zero_shot_classifier(cfg, params, tok, class_names, templates)
    pred = np.argmax(embed_images(cfg, params, images) @ cls.T, axis=1)
    return float(np.mean(pred == np.asarray(labels)))


def retrieval_recall(image_emb, text_emb, ks=(1, 5)) -> dict:
    """Image<->text R@k where pair i is (image i, text i)."""
    sims = np.asarray(image_emb) @ np.asarray(text_emb).T  # [N, N]
    n = sims.shape[0]
    diag = sims[np.arange(n), np.arange(n)]
    rank_i2t = np.sum(sims > diag[:, None], axis=1)  # texts scoring above the true one
    rank_t2i = np.sum(sims > diag[None, :], axis=0)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(rank_i2t < k))
        out[f"t2i_R@{k}"] = float(np.mean(rank_t2i < k))
    return out


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU-4 (sacrebleu, multi-reference) and mean ROUGE-L F1 x100 (best reference)."""
    try:  # the project's wrappers (lm_jax.eval) when present
        return {
            "bleu4": bleu(list(hypotheses), list(references)),
            "rougeL": rouge(list(hypotheses), list(references), types=("rougeL",))["rougeL"],
        }
    except ImportError:
        pass
    import sacrebleu
    from rouge_score import rouge_scorer

    n_refs = max(len(r) for r in references)
    streams = [[r[j] if j < len(r) else None for r in references] for j in range(n_refs)]
    score = sacrebleu.corpus_bleu(list(hypotheses), streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rl = [scorer.score_multi(list(r), h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return {"bleu4": float(score), "rougeL": float(100 * np.mean(rl))}


# --------------------------------------------------------------------------- recipes


def tiny_configs(vocab: int, canvas: int = 48, width: int = 64, layers: int = 3, patch: int = 8):
    """(TwoTowerConfig, CaptionerConfig) of the small models used by the experiment script."""
    block = dict(
        d_model=width, num_layers=layers, num_heads=4, mlp_dim=4 * width, norm="layernorm",
        activation="gelu_tanh", gated_mlp=False, use_bias=True, position="learned",
        scan_unroll=layers,
    )  # fmt: skip
    vision = VisionConfig(
        ModelConfig(vocab_size=1, max_len=1, **block), canvas, patch, 1, "learned", "cls", True
    )
    text = TextConfig(ModelConfig(vocab_size=vocab, max_len=40, **block), True, "eos", 2)
    two = TwoTowerConfig(vision, text, embed_dim=width)
    dec = ModelConfig(vocab_size=vocab, max_len=vision.num_tokens + 48, **block)
    return two, CaptionerConfig(vision, dec, "mlp")


class ImageTextTask(Task):
    """Contrastive or captioning training on a resumable (grain) batch iterator."""

    def __init__(self, cfg, tx, batches, mesh, seed: int = 0):
        self.cfg, self.tx, self.batches, self.mesh, self.seed = cfg, tx, batches, mesh, seed
        self.rng = jax.random.key(seed + 1)
        self._step_fn = None
        self._batch: dict = {}

    def init_state(self):
        state, sh = init_state(self.cfg, self.tx, self.mesh, self.seed)
        self._step_fn = jit_train_step(self.cfg, self.tx, sh, self.mesh)
        return state

    def meta(self) -> dict:
        return {"image_text": json.loads(json.dumps(dataclasses.asdict(self.cfg), default=str))}

    def host_state(self) -> dict:
        return json.loads(json.dumps(self.batches.get_state()))  # JSON, as checkpoints hold it

    def set_host_state(self, state: dict) -> None:
        self.batches.set_state(state)

    def train_step(self, state, step: int):
        self._batch = batch = device_batch(next(self.batches))
        with jax.set_mesh(self.mesh):
            return self._step_fn(state, batch, self.rng)

    def step_record(self, step: int, metrics: dict, state) -> dict:
        import hashlib

        h = hashlib.sha256()
        for k in sorted(self._batch):
            h.update(np.asarray(self._batch[k]).tobytes())
        return {
            "step": step,
            "loss_hex": float(metrics["loss"]).hex(),
            "batch_hash": h.hexdigest()[:16],
            "params_hash": params_hash(state.params),
        }


def fit(cfg, tx, batches, steps: int, mesh, seed: int = 0, log_every: int = 100, log=print, *,
        workdir: str | None = None, save_every: int = 0, log_step_details: bool = False,
        progress_bar: bool = False):  # fmt: skip
    """Train `steps` steps on a resumable iterator of host batches (`get_state`/`set_state`,
    e.g. a grain iterator) through the one loop; returns (state, last metrics). With
    `workdir`, checkpoints every `save_every` steps and at the end, and the same call resumes
    exactly; None = a temporary folder and no checkpoints."""
    import tempfile

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lm_jax_image_text_")
        workdir = tmp.name
    loop_cfg = TrainConfig(
        steps=steps, workdir=workdir, log_every=log_every, save_every=save_every, eval_every=0,
        progress_bar=progress_bar, log_step_details=log_step_details, async_checkpointing=False,
    )  # fmt: skip
    task = ImageTextTask(cfg, tx, batches, mesh, seed)
    try:
        res = engine.run(task, loop_cfg, log, save=tmp is None)
    finally:
        if tmp is not None:
            tmp.cleanup()
    last = {k.removeprefix("train/"): v for k, v in res.train.items()}
    return res.state, {k: float(v) for k, v in last.items() if np.ndim(v) == 0}


def save_caption_grid(path: str, images, captions: Sequence[str], cols: int = 4) -> None:
    """A PNG grid of uint8 images [N, H, W, 1] titled with their (generated) captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows))
    for ax, im, cap in zip(np.ravel(axes), images, captions):
        ax.imshow(np.asarray(im)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title("\n".join(textwrap.wrap(cap, 30)), fontsize=8)
    for ax in np.ravel(axes):
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
