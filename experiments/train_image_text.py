"""Image-text on composed scenes: contrastive (CLIP/SigLIP) or captioning (ViT prefix -> LM).

.venv/bin/python experiments/train_image_text.py --image_text.mode=contrastive --train.steps=1500
.venv/bin/python experiments/train_image_text.py --image_text.mode=caption --train.steps=1500

Flags: `--image_text.x` (ImageTextConfig below) and `--train.x` (steps, learning_rate,
weight_decay, grad_clip, mesh, seed, log_every, save_every, log_step_details, workdir: the
results JSON and parameters; checkpoints in <workdir>/<mode>, and a rerun resumes from them).
The pre-1.0 spellings (--mode, --steps, --batch, --lr, --out, ...) still work for one release,
with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal

import flax.serialization
import jax
import numpy as np
import optax
from absl import flags

from lm_jax import cli
from lm_jax.configs.train import TrainConfig
from lm_jax.data import scenes
from lm_jax.data.images import load_images
from lm_jax.errors import ConfigError
from lm_jax.generate import generate_with_prefix
from lm_jax.sharding import make_mesh
from lm_jax.train import image_text as it

CANVAS = 48  # scene side in pixels


@dataclasses.dataclass(frozen=True)
class ImageTextConfig:
    """What to train on which scenes (`--image_text.<field>`)."""

    mode: Literal["contrastive", "caption"] = "contrastive"
    loss: Literal["clip", "siglip"] = "clip"  # contrastive loss
    source: str = "auto"  # images: auto, fashion_mnist, mnist5k, digits, tfds:<name>
    data_dir: str = "/tmp/lm_jax_scenes"  # tfds folder of the composed scenes
    num_train: int = 30000  # training scenes
    num_test: int = 1000  # held-out scenes (held-out phrasing and class pairs)
    batch_size: int = 128  # global batch
    width: int = 64  # model width of all towers
    layers: int = 3  # blocks per tower
    patch: int = 8  # ViT patch side in pixels (must divide the 48-pixel canvas)
    rephrase: bool = True  # re-caption each training scene per read in a random phrasing
    class_only_fraction: float | None = None  # with rephrase: share of classes-only captions

    def __post_init__(self):
        checks = [
            (self.num_train >= 1 and self.num_test >= 1, "num_train and num_test must be >= 1"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.layers >= 1, f"layers must be >= 1, got {self.layers}"),
            (
                self.width >= 4 and self.width % 4 == 0,
                f"width must be a positive multiple of the 4 heads, got {self.width}",
            ),
            (
                self.patch >= 1 and CANVAS % self.patch == 0,
                f"patch must divide the {CANVAS}-pixel canvas, got {self.patch} (e.g. 8)",
            ),
            (
                self.class_only_fraction is None or 0.0 <= self.class_only_fraction <= 1.0,
                f"class_only_fraction must be in [0, 1], got {self.class_only_fraction}",
            ),
            (
                self.source in ("auto", "fashion_mnist", "mnist5k", "digits")
                or self.source.startswith("tfds:"),
                f"source must be auto, fashion_mnist, mnist5k, digits or tfds:<name>, "
                f"got {self.source!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


TRAIN_FIELDS = ("steps", "learning_rate", "weight_decay", "grad_clip", "mesh", "seed")
TRAIN_FIELDS += ("log_every", "workdir", "save_every", "log_step_details")
F = flags.FLAGS
flags.DEFINE_string("grid", "", "caption grid PNG path (caption mode)")
cli.define_config("image_text", ImageTextConfig)
cli.define_config("train", TrainConfig, fields=TRAIN_FIELDS)
for _f in dataclasses.fields(ImageTextConfig):
    if _f.name != "batch_size":
        cli.deprecate(_f.name, f"image_text.{_f.name}")
cli.deprecate("batch", "image_text.batch_size")
cli.deprecate("steps", "train.steps")
cli.deprecate("lr", "train.learning_rate")
cli.deprecate("out", "train.workdir")


def defaults() -> tuple[ImageTextConfig, TrainConfig]:
    train = TrainConfig(steps=1500, learning_rate=2e-3, weight_decay=0.05, log_every=100)
    train = train.replace(save_every=500)
    return ImageTextConfig(), train.replace(workdir="/tmp/lm_jax_image_text")


def check_paths(c: ImageTextConfig, workdir: str) -> None:
    """Folders that cannot be used fail before any data is built."""
    from lm_jax.checkpoint import KIND_NAMES, CheckpointError, workdir_kind

    for flag, path in (("--image_text.data_dir", c.data_dir), ("--train.workdir", workdir)):
        p = os.path.abspath(path)
        while not os.path.exists(p):
            p = os.path.dirname(p)
        if not os.path.isdir(p):
            raise ConfigError(f"{flag}={path}: {p!r} is a file, not a folder; give a folder")
    kind = "decoder" if os.path.isdir(os.path.join(workdir, "checkpoints")) else None
    kind = kind or workdir_kind(workdir)
    if kind not in (None, "image_text"):
        what = "a decoder training run" if kind == "decoder" else KIND_NAMES[kind]
        raise CheckpointError(
            f"--train.workdir={workdir} holds {what}; give the image-text run a folder of its own"
        )


def main(_):
    c0, t0 = defaults()
    c, tc = cli.config("image_text", c0), cli.config("train", t0)
    mesh = make_mesh(tc.mesh)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if c.batch_size % dp:
        raise ConfigError(
            f"--image_text.batch_size={c.batch_size} is not divisible by the {dp} data-parallel "
            f"devices of mesh {dict(mesh.shape)}: change it or --train.mesh"
        )
    check_paths(c, tc.workdir)
    builder = scenes.build_scenes(c.data_dir, c.source, num_train=c.num_train, num_test=c.num_test)
    names = scenes.class_names_of(builder)
    tok = scenes.WordTokenizer.for_classes(names)
    two, cap = it.tiny_configs(tok.vocab_size, width=c.width, layers=c.layers, patch=c.patch)
    caption_mode = c.mode == "caption"
    cfg = cap if caption_mode else dataclasses.replace(two, loss=c.loss)
    sched = optax.warmup_cosine_decay_schedule(
        0, tc.learning_rate, max(1, tc.steps // 20), tc.steps
    )
    clip = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip else []
    tx = optax.chain(*clip, optax.adamw(sched, weight_decay=tc.weight_decay))
    max_len = 40 if not caption_mode else cfg.decoder.max_len - cfg.num_prefix
    batches = iter(
        scenes.scene_batches(
            builder,
            "train",
            c.batch_size,
            tok,
            max_len,
            bos=caption_mode,
            rephrase=c.rephrase,
            class_only_fraction=c.class_only_fraction,
        )
    )
    state, last = it.fit(
        cfg, tx, batches, tc.steps, mesh, seed=tc.seed, log_every=tc.log_every,
        workdir=os.path.join(tc.workdir, c.mode), save_every=tc.save_every,
        log_step_details=tc.log_step_details,
    )  # fmt: skip
    test = builder.as_data_source("test")
    rows = [test[i] for i in range(len(test))]
    images = np.stack([r["image"] for r in rows])
    res = {"mode": c.mode, "source": builder.builder_config.source, "steps": tc.steps, **last}
    if not caption_mode:
        comp = scenes.SceneComposer(load_images(builder.builder_config.source, "test"))
        zs = np.stack([comp.single(i) for i in range(len(comp.labels))])[..., None]
        acc = it.zero_shot_accuracy(
            cfg, state.params, tok, zs, comp.labels, names, scenes.PROMPT_TEMPLATES
        )
        held = [r["caption"].decode() for r in rows]  # held-out phrasing
        trained = [scenes.layout_captions(r, names, (0,))[0] for r in rows]
        img = it.embed_images(cfg, state.params, images)
        for tag, texts in (("heldout_phrasing", held), ("train_phrasing", trained)):
            t, m = scenes.encode_texts(tok, texts, 40)
            r = it.retrieval_recall(img, it.embed_texts(cfg, state.params, t, m))
            res.update({f"{tag}/{k}": v for k, v in r.items()})
        res.update(zero_shot_acc=acc, zero_shot_images=len(zs))
    else:
        out = generate_with_prefix(
            cfg, state.params, it.to_unit(images), tok.bos_id, tok.eos_id, 47
        )
        hyps = [tok.decode(t) for t in np.asarray(out.tokens)]
        refs = [scenes.layout_captions(r, names) for r in rows]
        res.update(it.caption_metrics(hyps, refs))
        res["examples"] = [{"generated": h, "reference": r[0]} for h, r in zip(hyps[:8], refs)]
        if F.grid:
            it.save_caption_grid(F.grid, images[:16], hyps[:16])
    res["test_scenes"] = len(rows)
    os.makedirs(tc.workdir, exist_ok=True)
    with open(os.path.join(tc.workdir, f"{c.mode}_params.msgpack"), "wb") as f:
        f.write(flax.serialization.to_bytes(jax.device_get(state.params)))
    with open(os.path.join(tc.workdir, f"{c.mode}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=1))


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    cli.run(main)
