"""The one scan over residual blocks, shared by the decoder, the ViT and the text tower."""

from __future__ import annotations

import flax.linen as nn
import jax

from lm_jax.nn.lora import ROWS

REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def remat_block(block_cls, remat: str):
    """`block_cls` under `jax.checkpoint` with the `cfg.remat` policy ('none': as is)."""
    if remat == "none":
        return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=False)


def scan_blocks(
    block_cls,
    cfg,
    *block_args,
    length: int | None = None,
    remat: bool = True,
    name="layers",
    in_axes=(nn.broadcast, nn.broadcast, 0),
):
    """`length` (default `cfg.num_layers`) copies of `block_cls(cfg, *block_args)` under
    `nn.scan`, params (and `intermediates` / `aux`) stacked on a leading axis under `name`,
    dropout rngs split per layer, `cfg.scan_unroll` steps unrolled; each block rematerialised
    with `cfg.remat` unless `remat=False` (a block that remats its own sub-blocks).

    Build inside a compact module and call as `layers(x [B,T,D], positions, segment_ids,
    cache)` -> (x, cache): positions / segment_ids are broadcast to every layer, cache (or
    None) is scanned over its leading axis. `in_axes` may add per-layer arguments after the
    cache (the decoder's `local` flags [L]: axis 0).
    """
    n = cfg.num_layers if length is None else int(length)
    cls = remat_block(block_cls, cfg.remat) if remat else block_cls
    return nn.scan(
        cls,
        variable_axes={"params": 0, "intermediates": 0, "aux": 0, ROWS: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=n,
        unroll=min(cfg.scan_unroll, n),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, *block_args, name=name)
