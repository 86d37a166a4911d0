"""Image-text on composed scenes: contrastive (CLIP/SigLIP) or captioning (ViT prefix -> LM).

.venv/bin/python experiments/train_image_text.py --mode=contrastive --steps=1500
.venv/bin/python experiments/train_image_text.py --mode=caption --steps=1500
"""

import dataclasses
import json
import os

import flax.serialization
import jax
import numpy as np
import optax
from absl import app, flags

from lm_jax.data import scenes
from lm_jax.data.images import load_images
from lm_jax.nn.two_towers import generate_with_prefix
from lm_jax.sharding import make_mesh
from lm_jax.train import image_text as it

F = flags.FLAGS
flags.DEFINE_enum("mode", "contrastive", ["contrastive", "caption"], "what to train")
flags.DEFINE_enum("loss", "clip", ["clip", "siglip"], "contrastive loss")
flags.DEFINE_string("source", "auto", "images: auto, fashion_mnist, mnist5k, digits")
flags.DEFINE_string("data_dir", "/tmp/lm_jax_scenes", "tfds folder of the composed scenes")
flags.DEFINE_integer("num_train", 30000, "training scenes")
flags.DEFINE_integer("num_test", 1000, "held-out scenes (held-out phrasing and class pairs)")
flags.DEFINE_integer("steps", 1500, "optimizer steps")
flags.DEFINE_integer("batch", 128, "global batch")
flags.DEFINE_integer("width", 64, "model width of all towers")
flags.DEFINE_integer("layers", 3, "blocks per tower")
flags.DEFINE_integer("patch", 8, "ViT patch side in pixels (must divide the 48-pixel canvas)")
flags.DEFINE_bool("rephrase", True, "re-caption each training scene per read in a random phrasing")
flags.DEFINE_float(
    "class_only_fraction", None, "with --rephrase: share of classes-only captions (default 1/5)"
)
flags.DEFINE_float("lr", 2e-3, "peak learning rate (cosine, 5% warm-up)")
flags.DEFINE_string("out", "/tmp/lm_jax_image_text", "results JSON / caption grid folder")
flags.DEFINE_string("grid", "", "caption grid PNG path (caption mode)")
flags.DEFINE_string("workdir", "", "checkpoints and metrics; reruns resume (default <out>/<mode>)")
flags.DEFINE_integer("save_every", 500, "steps between checkpoints (and at the end)")
flags.DEFINE_integer("seed", 0, "parameter init and dropout")
flags.DEFINE_bool("log_step_details", False, "per-step JSONL: loss hex, batch and params hashes")


def main(_):
    builder = scenes.build_scenes(F.data_dir, F.source, num_train=F.num_train, num_test=F.num_test)
    names = scenes.class_names_of(builder)
    tok = scenes.WordTokenizer.for_classes(names)
    two, cap = it.tiny_configs(tok.vocab_size, width=F.width, layers=F.layers, patch=F.patch)
    caption_mode = F.mode == "caption"
    cfg = cap if caption_mode else dataclasses.replace(two, loss=F.loss)
    sched = optax.warmup_cosine_decay_schedule(0, F.lr, max(1, F.steps // 20), F.steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.05))
    max_len = 40 if not caption_mode else cfg.decoder.max_len - cfg.num_prefix
    batches = iter(
        scenes.scene_batches(
            builder,
            "train",
            F.batch,
            tok,
            max_len,
            bos=caption_mode,
            rephrase=F.rephrase,
            class_only_fraction=F.class_only_fraction,
        )
    )
    workdir = F.workdir or os.path.join(F.out, F.mode)
    state, last = it.fit(
        cfg, tx, batches, F.steps, make_mesh(), F.seed, log_every=100, workdir=workdir,
        save_every=F.save_every, log_step_details=F.log_step_details,
    )  # fmt: skip
    test = builder.as_data_source("test")
    rows = [test[i] for i in range(len(test))]
    images = np.stack([r["image"] for r in rows])
    res = {"mode": F.mode, "source": builder.builder_config.source, "steps": F.steps, **last}
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
    os.makedirs(F.out, exist_ok=True)
    with open(os.path.join(F.out, f"{F.mode}_params.msgpack"), "wb") as f:
        f.write(flax.serialization.to_bytes(jax.device_get(state.params)))
    with open(os.path.join(F.out, f"{F.mode}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=1))


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    app.run(main)
