"""nanoGPT's CPU recipe in PyTorch, written after karpathy/nanoGPT (model.py, train.py), as a
reference for lm_jax's `--preset=nanogpt_cpu` on the same machine and the same evaluation.

The recipe (nanoGPT README, "I only have a macbook"): config/train_shakespeare_char.py with
`--device=cpu --compile=False --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4
--n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`, i.e. lr 1e-3,
min_lr 1e-4, 100 warmup iters, beta2 0.99, weight decay 0.1 on >= 2-D tensors, clip 1.0,
bias=False, tied embeddings, GELU, c_proj std 0.02 / sqrt(2 n_layer), random windows with
replacement, f32. The README quotes val loss ~1.88 (one run, 20 random validation batches).

Two validation figures per seed: nanoGPT's own estimate (20 random batches of 12 x 64) and
lm_jax's (every character of the last 10%, non-overlapping 64-character windows).

  .venv/bin/python -m benchmarks.nanogpt_reference --seeds=0,1,2,3
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from torch import nn

flags.DEFINE_string("data", "../shared/data/tinyshakespeare/input.txt", "nanoGPT's input.txt.")
flags.DEFINE_list("seeds", ["0"], "Seeds (torch.manual_seed(1337 + seed), as nanoGPT's offset).")
flags.DEFINE_integer("iters", 2000, "max_iters = lr_decay_iters.")
flags.DEFINE_integer("threads", 2, "torch CPU threads.")
flags.DEFINE_enum(
    "schedule", "cosine", ["cosine", "wsd"],
    "cosine: nanoGPT's get_lr. wsd: not nanoGPT's recipe; lm_jax's --train.lr_schedule=wsd "
    "(peak until the last 20%, then a 1 - sqrt cooldown to min_lr), for a like-for-like check.",
)  # fmt: skip
flags.register_validator("iters", lambda n: n > 100, "--iters must exceed the 100 warm-up steps.")
FLAGS = flags.FLAGS

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, BETA2, WD, CLIP = 1e-3, 1e-4, 100, 0.99, 0.1, 1.0


class LayerNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = LayerNorm(N_EMBD), LayerNorm(N_EMBD)
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.attn_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.mlp_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(N_EMBD, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, N_EMBD), nn.Embedding(BLOCK, N_EMBD)
        self.h = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)
        for name, p in self.named_parameters():
            if name.endswith("_proj.weight"):  # nanoGPT's c_proj (attention and MLP)
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * N_LAYER))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def lr_at(it: int, iters: int, schedule: str = "cosine") -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if schedule == "wsd":
        start = iters - round(0.2 * iters)
        t = min(max((it - start) / (iters - start), 0.0), 1.0)
        return MIN_LR + (1.0 - math.sqrt(t)) * (LR - MIN_LR)
    ratio = (it - WARMUP) / (iters - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (LR - MIN_LR)


def run_seed(seed: int, train, val, vocab: int, iters: int) -> dict:
    torch.manual_seed(1337 + seed)
    model = GPT(vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WD},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, BETA2))

    def batch(data):
        ix = torch.randint(len(data) - BLOCK, (BATCH,))
        x = torch.stack([data[i : i + BLOCK] for i in ix])
        return x, torch.stack([data[i + 1 : i + 1 + BLOCK] for i in ix])

    t0 = time.time()
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, iters, FLAGS.schedule)
        loss = model(*batch(train))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall = time.time() - t0
    model.eval()
    with torch.no_grad():
        estimate = float(np.mean([model(*batch(val)).item() for _ in range(20)]))
        n = (len(val) - 1) // BLOCK
        xs = val[: n * BLOCK].view(n, BLOCK)
        ys = val[1 : n * BLOCK + 1].view(n, BLOCK)
        # chunks of 64 windows (the last one shorter): weight each chunk's mean by its rows
        sizes = [min(64, n - i) for i in range(0, n, 64)]
        losses = [model(xs[i : i + 64], ys[i : i + 64]).item() for i in range(0, n, 64)]
        full = float(np.dot(losses, sizes) / n)
    return {"seed": seed, "val_estimate_20_batches": estimate, "val_full": full, "train_s": wall}


def main(_):
    torch.set_num_threads(FLAGS.threads)
    text = open(FLAGS.data, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    rows = [run_seed(int(s), train, val, len(chars), FLAGS.iters) for s in FLAGS.seeds]
    print("| seed | val (nanoGPT estimate, 20 x 12 x 64) | val (every character) | train s |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['val_estimate_20_batches']:.4f} | {r['val_full']:.4f} "
            f"| {r['train_s']:.0f} |"
        )
    full = [r["val_full"] for r in rows]
    print(f"median over seeds (all validation characters): {float(np.median(full)):.4f}")


if __name__ == "__main__":
    app.run(main)
