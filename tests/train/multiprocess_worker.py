"""Worker for test_multiprocess: one of N processes (4 CPU devices each) taking train steps.

usage: python multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_JSON
(NUM_PROCESSES=0: a single process with 8 devices, the reference).
"""

import json
import os
import sys

port, nproc, pid, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
local = 8 if nproc == 0 else 8 // nproc
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if nproc:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", nproc, pid)

import numpy as np  # noqa: E402

from lm_jax.configs import llama_style  # noqa: E402
from lm_jax.configs.train import TrainConfig  # noqa: E402
from lm_jax.optim import make_optimizer  # noqa: E402
from lm_jax.sharding import batch_sharding, make_mesh  # noqa: E402
from lm_jax.train.state import init_train_state  # noqa: E402
from lm_jax.train.step import jit_train_step  # noqa: E402

MODEL = llama_style(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=32
)
TRAIN = TrainConfig(steps=5, learning_rate=3e-3, warmup_steps=1)
B, T = 8, 16

mesh = make_mesh("data:4,fsdp:2")
tx = make_optimizer(TRAIN)
state, sh = init_train_state(MODEL, tx, mesh, seed=0)
bsh = batch_sharding(mesh, 2, B)
step = jit_train_step(MODEL, TRAIN, tx, sh, bsh)
rows = B // jax.process_count()
lo = jax.process_index() * rows
losses = []
for i in range(4):
    toks = np.random.default_rng(i % 2).integers(0, MODEL.vocab_size, (B, T + 1)).astype(np.int32)
    full = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
        "segment_ids": np.ones((B, T), np.int32),
        "loss_mask": np.ones((B, T), np.float32),
    }
    batch = {
        k: jax.make_array_from_process_local_data(bsh, np.ascontiguousarray(v[lo : lo + rows]))
        for k, v in full.items()
    }
    state, m = step(state, batch, jax.random.key(0))
    losses.append(float(m["loss"]))
with open(out, "w") as f:
    json.dump(
        {"losses": losses, "process_count": jax.process_count(), "devices": jax.device_count()}, f
    )
