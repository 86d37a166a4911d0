"""Checks a user runs first on new hardware (`experiments/verify.py`): on the devices JAX finds,
every kernel and layout choice agrees with its reference, and a checkpoint moves between meshes
to the bit. Each check builds a tiny random model, runs both sides and returns a `Check`:

- attention: each `attention_impl` usable here (xla always; splash on TPU and in interpret mode
  on CPU; cuDNN on an NVIDIA GPU) against a plain masked-softmax reference, forward logits;
- moe: capacity dispatch with room for every token equals dropless dispatch;
- chunked_loss: the loss and every gradient with the head in chunks equal the unchunked ones;
- sharded: forward logits on a data x fsdp x tensor mesh of every device equal one device's;
- cross_mesh_restore: a train state saved from one mesh restores bitwise on three others;
- hf_parity (transformers and torch importable): a random HF Llama's logits after `from_hf`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax.configs import MoEConfig, llama_style
from lm_jax.configs.train import TrainConfig
from lm_jax.nn import Transformer
from lm_jax.sharding import make_mesh, params_shardings


@dataclasses.dataclass
class Check:
    name: str
    detail: str  # what was compared
    diff: float  # max |a - b| (0 for bitwise checks that hold)
    tol: float
    seconds: float = 0.0
    skipped: str = ""  # why, when the check cannot run here

    @property
    def ok(self) -> bool:
        return bool(self.skipped) or self.diff <= self.tol

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("ok" if self.ok else "FAIL")


def _cfg(**kw):
    base = dict(vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                mlp_dim=96, max_len=64)  # fmt: skip
    return llama_style(**{**base, **kw})


def _params(cfg, seed=0):
    import flax.linen as nn

    toks = jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(Transformer(cfg).init(jax.random.key(seed), toks)["params"])


def _tokens(cfg, b=4, t=48, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_attention() -> list[Check]:
    backend = jax.default_backend()
    impls = ["splash"]
    platform = getattr(jax.devices()[0].client, "platform_version", "").lower()
    if backend == "gpu" and "rocm" not in platform:  # cuDNN: NVIDIA GPUs only
        impls.append("cudnn")
    ref_cfg = _cfg(max_len=128)
    params, toks = _params(ref_cfg), _tokens(ref_cfg, b=2, t=128)  # splash: blocks of 128
    ref = jax.jit(lambda p, x: Transformer(ref_cfg).apply({"params": p}, x))(params, toks)
    out = []
    for impl in impls:
        cfg = ref_cfg.replace(attention_impl=impl)
        tol = 2e-2 if impl == "cudnn" else 1e-4
        if impl == "cudnn":
            cfg = cfg.replace(dtype="bfloat16")
        try:
            got = jax.jit(lambda p, x, c=cfg: Transformer(c).apply({"params": p}, x))(params, toks)
        except Exception as e:  # noqa: BLE001 - a kernel this backend lacks: reported, not raised
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            out.append(Check(f"attention:{impl}", "logits vs xla", 0.0, tol, skipped=why))
            continue
        diff = _maxdiff(got, ref)
        out.append(Check(f"attention:{impl}", f"logits vs xla ({backend})", diff, tol))
    return out


def check_moe() -> list[Check]:
    moe = MoEConfig(num_experts=4, top_k=2, dispatch="dropless")
    cfg = _cfg(moe=moe)
    params, toks = _params(cfg), _tokens(cfg)
    run = lambda c: Transformer(c).apply({"params": params}, toks)  # noqa: E731
    ref = run(cfg)
    roomy = dataclasses.replace(moe, dispatch="capacity", capacity_factor_train=4.0,
                                capacity_factor_eval=4.0)  # fmt: skip
    got = run(cfg.replace(moe=roomy))
    what = "capacity (factor 4: nothing dropped) vs dropless"
    return [Check("moe", what, _maxdiff(got, ref), 1e-5)]


def check_chunked_loss() -> list[Check]:
    from lm_jax.train.step import loss_and_metrics

    cfg = _cfg()
    params, toks = _params(cfg), _tokens(cfg, t=33)
    b, t = toks.shape[0], toks.shape[1] - 1
    batch = {
        "inputs": toks[:, :-1], "targets": toks[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
        "segment_ids": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.float32),
    }  # fmt: skip

    def grads(chunk):
        tc = TrainConfig(loss_chunk=chunk)
        f = lambda p: loss_and_metrics(p, batch, cfg, tc, jax.random.key(0), False)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(params)

    (l0, g0), (l1, g1) = grads(0), grads(8)
    leaves = zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True)
    diff = max([_maxdiff(l0, l1) / max(abs(float(l0)), 1.0)] + [_maxdiff(a, b) for a, b in leaves])
    what = "loss (relative) and gradients, chunks of 8 vs none"
    return [Check("chunked_loss", what, diff, 1e-5)]


def check_sharded() -> list[Check]:
    n = jax.device_count()
    if n < 2:
        return [Check("sharded", "logits on a mesh vs one device", 0.0, 1e-5,
                      skipped="one device")]  # fmt: skip
    tensor = 2 if n % 2 == 0 else 1
    fsdp = 2 if n % (2 * tensor) == 0 else 1
    spec = f"data:{n // (tensor * fsdp)},fsdp:{fsdp},tensor:{tensor}"
    cfg = _cfg()
    params, toks = _params(cfg), _tokens(cfg, b=2 * n)
    fwd = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x))
    ref = fwd(params, toks)
    mesh = make_mesh(spec)
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), toks[:1, :8])["params"]
    with jax.set_mesh(mesh):
        got = fwd(jax.device_put(params, params_shardings(abstract, mesh)), toks)
    return [Check("sharded", f"logits on mesh {spec} vs one device", _maxdiff(got, ref), 1e-5)]


def check_cross_mesh_restore() -> list[Check]:
    from lm_jax.checkpoint import Checkpointer
    from lm_jax.optim import make_optimizer
    from lm_jax.train.state import init_train_state, state_shardings

    n = jax.device_count()
    cfg, tx = _cfg(), make_optimizer(TrainConfig())
    meshes = [f"data:1,fsdp:{n}", f"data:{n},fsdp:1", ""]
    if n % 2 == 0 and n > 2:
        meshes.insert(2, f"data:{n // 2},tensor:2")
    with tempfile.TemporaryDirectory() as d:
        state, _ = init_train_state(cfg, tx, make_mesh(meshes[0]), seed=1)
        ckpt = Checkpointer(d)
        ckpt.save(1, state, {}, {"model": {}}, force=True)
        ckpt.wait()
        ref = [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(state))]
        bad = 0
        for spec in meshes[1:]:
            devs = jax.devices()[:1] if spec == "" else None
            mesh = make_mesh(spec, devices=devs)
            abstract, sh = state_shardings(cfg, tx, mesh)
            _, got, _, _ = Checkpointer(d).restore_latest(abstract, sh)
            leaves = [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(got))]
            bad += sum(a != b for a, b in zip(leaves, ref, strict=True))
    names = " -> ".join(m or "1 device" for m in meshes)
    return [Check("cross_mesh_restore", f"{names}: leaves not bitwise equal", float(bad), 0.0)]


def check_hf_parity() -> list[Check]:
    try:
        import torch
        import transformers
    except ImportError:
        return [Check("hf_parity", "random HF Llama logits", 0.0, 1e-4,
                      skipped="transformers / torch not installed")]  # fmt: skip
    from lm_jax.convert import from_hf

    torch.manual_seed(0)
    c = transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.1,
    )  # fmt: skip
    c._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(c).eval().float()
    cfg, params = from_hf(hf)
    toks = np.asarray(_tokens(cfg, b=2, t=40))
    with torch.no_grad():
        ref = hf(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    got = Transformer(cfg).apply({"params": params}, jnp.asarray(toks))
    return [Check("hf_parity", "random HF Llama logits after from_hf", _maxdiff(got, ref), 1e-4)]


CHECKS: dict[str, Callable[[], list[Check]]] = {
    "attention": check_attention,
    "moe": check_moe,
    "chunked_loss": check_chunked_loss,
    "sharded": check_sharded,
    "cross_mesh_restore": check_cross_mesh_restore,
    "hf_parity": check_hf_parity,
}


def run_checks(names=None) -> list[Check]:
    """Run the named checks (default: all), timing each."""
    out = []
    for name in names or list(CHECKS):
        t = time.perf_counter()
        got = CHECKS[name]()
        for c in got:
            c.seconds = (time.perf_counter() - t) / len(got)
        out.extend(got)
    return out


def table(checks: list[Check]) -> str:
    devs = jax.devices()
    head = f"{len(devs)} x {devs[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    rows = [head, "", "| check | compared | max diff | tolerance | status | s |"]
    rows.append("|---|---|---|---|---|---|")
    for c in checks:
        diff = "-" if c.skipped else f"{c.diff:.2e}"
        status = f"skip ({c.skipped})" if c.skipped else c.status
        rows.append(
            f"| {c.name} | {c.detail} | {diff} | {c.tol:.0e} | {status} | {c.seconds:.1f} |"
        )
    return "\n".join(rows)
