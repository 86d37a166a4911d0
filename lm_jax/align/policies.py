"""LM policies on one frozen backbone: base a = adapters off, proposal q = a frozen adapter
snapshot, policy pi = the live adapter (LoRA; `lm_jax.adapters`). Without LoRA the policy and
proposal are full-parameter copies and the frozen tree is the base model.

Sequences are laid out as [prompt | continuation] of fixed length P + N; `mask` [B, P+N] marks
the generated tokens (stop token included), so log pi(x) = sum of masked token log-probs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm_jax import adapters as lora_lib
from lm_jax.align.samplers import SamplerConfig, Samples
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.generate import generate
from lm_jax.nn.transformer import Transformer
from lm_jax.scoring import score


def sequence_logprob(
    cfg: ModelConfig, params, tokens: jax.Array, mask: jax.Array, chunk: int = 0
) -> jax.Array:
    """Pure, jittable, differentiable log p(masked tokens | everything before): [B, T], [B, T]
    -> [B] (`lm_jax.scoring.score`; `chunk` > 0: the head `chunk` positions at a time)."""
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask[:, 1:]}
    return score(cfg, params, batch, chunk=chunk).sums


@dataclasses.dataclass(frozen=True)
class LMPolicy:
    """`config` runs the policy (with `lora` set for adapters); `base_config` runs a."""

    config: ModelConfig
    base_config: ModelConfig
    sampler: SamplerConfig
    logits_chunk: int = 0  # > 0: log-probs with the head applied this many positions at a time

    @property
    def uses_lora(self) -> bool:
        return self.config.lora is not None

    def full_params(self, trainable, frozen):
        return lora_lib.combine(frozen, trainable) if self.uses_lora else trainable

    def logprob_fn(self, trainable, frozen, tokens, mask):
        """log pi(x) (the tuners' `logprob_fn`)."""
        params = self.full_params(trainable, frozen)
        return sequence_logprob(self.config, params, tokens, mask, self.logits_chunk)

    def base_logprob(self, frozen, tokens, mask):
        """log a(x): the backbone with adapters off (or the frozen base copy)."""
        return sequence_logprob(self.base_config, frozen, tokens, mask, self.logits_chunk)

    def sample(self, trainable, frozen, key, batch_size: int) -> Samples:
        """Ancestral samples of pi (or of a proposal snapshot) laid out as [prompt | new]."""
        return self._sample(self.config, self.full_params(trainable, frozen), key, batch_size)

    def sample_base(self, frozen, key, batch_size: int) -> Samples:
        """Ancestral samples of the base model a."""
        return self._sample(self.base_config, frozen, key, batch_size)

    def _sample(self, cfg, params, key, batch_size: int) -> Samples:
        s = self.sampler
        P = len(s.prompt)
        prompt = np.broadcast_to(np.asarray(s.prompt, np.int32), (batch_size, P))
        out = generate(
            cfg,
            params,
            prompt,
            key,
            s.max_new_tokens,
            temperature=1.0,
            stop_tokens=tuple(s.stop_tokens),
        )
        N = out.tokens.shape[1]
        new_mask = (jnp.arange(N)[None, :] < out.lengths[:, None]).astype(jnp.float32)
        tokens = jnp.concatenate([jnp.asarray(prompt), out.tokens], axis=1)  # [B, P+N]
        mask = jnp.concatenate([jnp.zeros((batch_size, P), jnp.float32), new_mask], axis=1)
        log_q = jnp.sum(jnp.where(new_mask > 0, out.sample_logprobs, 0.0), axis=1)
        return Samples(tokens, mask, log_q, jnp.asarray(prompt))


def make_lm_policy(
    cfg: ModelConfig,
    params,
    sampler: SamplerConfig,
    lora: lora_lib.LoraConfig | None = None,
    seed: int = 0,
    logits_chunk: int = 0,
) -> tuple[LMPolicy, Any, Any]:
    """(policy, trainable, frozen). With `lora`: trainable = fresh adapters (B = 0, so pi = a at
    start), frozen = the backbone. Without: trainable = a copy of params, frozen = params.
    `logits_chunk` > 0: log-probs never build [B, T, V] logits (`sequence_logprob`)."""
    if logits_chunk < 0:
        raise ConfigError(f"logits_chunk must be >= 0 (0 = off), got {logits_chunk}.")
    params = nn.unbox(params)
    base_cfg = cfg.replace(lora=None)
    if lora is None:
        policy = LMPolicy(base_cfg, base_cfg, sampler, logits_chunk)
        return policy, jax.tree.map(jnp.copy, params), params
    frozen, extra = lora_lib.split_lora(params)
    if extra:
        raise ConfigError(
            "the base params already hold LoRA adapters: merge them first "
            "(lm_jax.adapters.merge) so the backbone is a plain model."
        )
    pcfg = cfg.replace(lora=lora)
    tokens = jnp.zeros((1, 2), jnp.int32)
    init = nn.unbox(Transformer(pcfg).init(jax.random.key(seed), tokens)["params"])
    _, adapters = lora_lib.split_lora(init)
    return LMPolicy(pcfg, base_cfg, sampler, logits_chunk), adapters, frozen
