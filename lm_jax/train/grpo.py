"""GRPO (Shao et al. 2024) and Dr. GRPO of a decoder LM, full or LoRA, as a task of the one loop.

Step s (0-based), all of it a function of (state, s):
  1. prompts: `grpo_data.step_indices(N, P, seed, s)` (P = prompts_per_step), each repeated
     G = num_generations times (rows g*G .. g*G+G-1 share prompt g);
  2. sample: the one sampler (`lm_jax.generate.generate`) from the current policy with key
     `fold_in(k_sample, s)`, temperature, max_new_tokens, stopping at EOS;
  3. reward: the text reward on the decoded completions -> group-normalised advantages
     (`lm_jax.losses_rl.group_advantages`);
  4. one jitted update: rows [B, T] = prompt + completion (loss mask on the completion tokens,
     EOS included), old log-probs (the scorer under the sampling params; skipped for mu = 1:
     TRL's detach shortcut), reference log-probs (beta > 0: LoRA scores the frozen base itself,
     no copy; full training a kept copy of the initial params), then mu = num_iterations
     clipped updates on the whole batch (`grad_accum` microbatches each). `state.step` counts
     GRPO steps; the learning-rate schedule counts the mu * steps optimizer updates.
Resume after kill -9 is exact (no host state: prompts and sampling keys derive from (seed, s)).

Metrics (train/): loss, reward, reward_std, frac_reward_zero_std, kl, clip_ratio (region),
clip_low, clip_high, ratio, grad_norm, completion_length, tokens, sample_time_share (share of
the step's wall time spent sampling), sampler_tokens_per_s. Evaluation (eval/): greedy
completions of the held-out prompts, their mean reward (exact-match accuracy for arith_exact)
and completion length.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm_jax import adapters as lora_lib
from lm_jax.checkpoint import meta_dict
from lm_jax.configs.base import ConfigError, ModelConfig
from lm_jax.configs.train import TrainConfig
from lm_jax.data.chat_template import resolve_template
from lm_jax.losses_rl import group_advantages, grpo_loss
from lm_jax.optim import make_optimizer
from lm_jax.scoring import score
from lm_jax.sharding import batch_sharding, make_mesh
from lm_jax.train import finetune as ft_lib
from lm_jax.train.chat_data import ChatEncoder, Message
from lm_jax.train.grpo_data import GRPOConfig, Prompt, RewardFn, step_indices
from lm_jax.train.loop import params_hash
from lm_jax.train.sampled_pairs import sample_completions
from lm_jax.train.sft_data import _encode, make_batch
from lm_jax.train.step import accumulate_grads, apply_update, mask_frozen
from lm_jax.train.tuning import (
    TunedModelTask,
    check_batching,
    check_model,
    prepare_model,
    run_tuning,
)

ROW_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


# --------------------------------------------------------------------------- rows and loss


def encode_prompt(tokenizer, text: str, prompt_len: int, template: str | None = None) -> list[int]:
    """Prompt ids with the tokenizer's special tokens, the oldest cut to `prompt_len`; with a
    chat `template` (jinja source), `text` as one user turn rendered for the assistant's reply
    and tokenized as transformers' apply_chat_template does (too long: ConfigError)."""
    if template is not None:
        chat = ChatEncoder(tokenizer, template, prompt_len)
        ids = list(chat.tokens(chat.render([Message("user", text)], add_generation_prompt=True)))
        if len(ids) > prompt_len:
            raise ConfigError(
                f"prompt {text!r} is {len(ids)} tokens in the chat template, more than "
                f"prompt_len {prompt_len}: raise --posttrain.prompt_len."
            )
        return ids
    ids = _encode(tokenizer, text, True)
    if not ids:
        raise ConfigError(f"prompt {text!r} tokenizes to nothing: give every prompt some text.")
    return ids[-prompt_len:]


def completion_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    seq_len: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Rows [B, seq_len] of prompt + completion (inputs, targets shifted by one, loss_mask 1
    exactly at the completion targets, positions, segment ids), right-padded."""
    enc = [(np.asarray(list(p) + list(c), np.int32), len(p)) for p, c in zip(prompts, completions)]
    return make_batch(enc, seq_len)


def policy_logps(cfg: ModelConfig, params, rows: dict, *, temperature: float = 1.0,
                 chunk: int = 0, deterministic: bool = True, rngs=None) -> jax.Array:  # fmt: skip
    """Per-token log-probs [B, T] of the rows' targets at `temperature` (the one scorer)."""
    batch = {k: rows[k] for k in ROW_KEYS}
    return score(cfg, params, batch, chunk=chunk, deterministic=deterministic, rngs=rngs,
                 temperature=temperature).token_logprobs  # fmt: skip


def loss_kwargs(g: GRPOConfig) -> dict:
    return dict(loss_type=g.loss_type, epsilon_low=g.epsilon, epsilon_high=g.epsilon_high_,
                beta=g.beta, max_completion_length=g.max_new_tokens,
                kl_bias_correction=g.kl_bias_correction)  # fmt: skip


def batch_loss(params, batch: dict, rng, *, model_cfg: ModelConfig, gcfg: GRPOConfig,
               chunk: int = 0, train: bool = True) -> tuple[jax.Array, dict]:  # fmt: skip
    """(GRPO loss, metrics) of a batch {rows..., advantages [B], old_logps? [B, T],
    ref_logps? [B, T]} for the policy `params` (the function the update differentiates)."""
    logps = policy_logps(model_cfg, params, batch, temperature=gcfg.temperature, chunk=chunk,
                         deterministic=not train, rngs={"dropout": rng})  # fmt: skip
    return grpo_loss(logps, batch["advantages"], batch["loss_mask"],
                     old_logps=batch.get("old_logps"), ref_logps=batch.get("ref_logps"),
                     **loss_kwargs(gcfg))  # fmt: skip


def update(state, batch: dict, ref_params, rng, *, model_cfg: ModelConfig,
           train_cfg: TrainConfig, gcfg: GRPOConfig, tx, trainable=None):  # fmt: skip
    """One GRPO step on a sampled batch: old / reference log-probs, then `num_iterations`
    clipped updates (a scan); returns (state with step + 1, metrics averaged over them)."""
    rng = jax.random.fold_in(rng, state.step)
    step0, t = state.step, gcfg.temperature
    batch = dict(batch)
    if gcfg.num_iterations > 1:
        batch["old_logps"] = jax.lax.stop_gradient(
            policy_logps(model_cfg, state.params, batch, temperature=t))
    if gcfg.beta:
        if ref_params is None:  # LoRA: the frozen base is the reference
            ref_cfg, ref_params = model_cfg.replace(lora=None), lora_lib.split_lora(state.params)[0]
        else:
            ref_cfg = model_cfg.replace(lora=None)
        batch["ref_logps"] = jax.lax.stop_gradient(policy_logps(ref_cfg, ref_params, batch,
                                                                temperature=t))  # fmt: skip
    grad_fn = jax.grad(batch_loss, has_aux=True)
    n = train_cfg.grad_accum

    def micro_grad(params, mb, r):
        return grad_fn(params, mb, r, model_cfg=model_cfg, gcfg=gcfg, chunk=train_cfg.loss_chunk)

    def one(st, i):
        grads, m = accumulate_grads(micro_grad, st.params, batch, jax.random.fold_in(rng, i), n)
        grads = mask_frozen(grads, st.params, trainable)
        if n > 1:
            grads, m = jax.tree.map(lambda g: g / n, grads), jax.tree.map(lambda v: v / n, m)
        new, grad_norm, finite = apply_update(st, grads, m["loss"], tx=tx, train_cfg=train_cfg)
        return new, {**m, "grad_norm": grad_norm, "finite": finite}

    state, ms = jax.lax.scan(one, state, jnp.arange(gcfg.num_iterations))
    m = {k: (jnp.all(v) if k == "finite" else jnp.mean(v)) for k, v in ms.items()}
    m["first_loss"] = ms["loss"][0]
    return state.replace(step=step0 + 1), m


def jit_update(model_cfg, train_cfg, gcfg, tx, state_sh, batch_sh, ref_sh, trainable=None):
    fn = functools.partial(update, model_cfg=model_cfg, train_cfg=train_cfg, gcfg=gcfg, tx=tx,
                           trainable=trainable)  # fmt: skip
    return jax.jit(fn, in_shardings=(state_sh, batch_sh, ref_sh, None),
                   out_shardings=(state_sh, None), donate_argnums=(0,))  # fmt: skip


# --------------------------------------------------------------------------- the task


class GRPOTask(TunedModelTask):
    """GRPO (full or LoRA) on the one loop: sample -> reward -> mu clipped updates."""

    def __init__(self, cfg, params, trainable, tokenizer, prompts: Sequence[Prompt],
                 reward: RewardFn, train_cfg: TrainConfig, gcfg: GRPOConfig, *, mesh,
                 eval_prompts: Sequence[Prompt] = (), base_name=None, log=print):  # fmt: skip
        super().__init__(cfg, params, trainable, train_cfg, gcfg, mesh=mesh,
                         base_name=base_name, log=log)  # fmt: skip
        mu = gcfg.num_iterations
        if mu > 1:  # the schedule counts optimizer updates: mu per GRPO step
            opt_cfg = train_cfg.replace(
                steps=train_cfg.steps * mu, warmup_steps=train_cfg.warmup_steps * mu,
                lr_decay_steps=None if train_cfg.lr_decay_steps is None
                else train_cfg.lr_decay_steps * mu)  # fmt: skip
            self.tx = make_optimizer(opt_cfg, trainable=trainable)
        self.gcfg, self.tokenizer, self.reward = gcfg, tokenizer, reward
        self.prompts, self.eval_prompts = list(prompts), list(eval_prompts)
        self.eval_at_start = bool(self.eval_prompts)  # the base model's held-out reward
        if not self.prompts:
            raise ConfigError("no training prompts.")
        template = (None if gcfg.chat_template is None
                    else resolve_template(gcfg.chat_template, tokenizer))  # fmt: skip
        enc = lambda ps: [encode_prompt(tokenizer, p.prompt, gcfg.prompt_len, template)  # noqa: E731
                          for p in ps]  # fmt: skip
        self.enc, self.enc_eval = enc(self.prompts), enc(self.eval_prompts)
        self.seq_len = gcfg.prompt_len + gcfg.max_new_tokens - 1
        self.k_sample = jax.random.fold_in(jax.random.key(train_cfg.seed), 0x6790)
        rows = batch_sharding(mesh, 2, gcfg.rows)
        self.bsh = {**{k: rows for k in ROW_KEYS}, "advantages": batch_sharding(mesh, 1, gcfg.rows)}
        self.ref = None
        ref_sh = None
        if gcfg.beta and gcfg.lora is None:  # full training: keep the initial params
            ref_sh = self.shardings.params
            self.ref = jax.device_put(jax.device_get(params), ref_sh)
        self.step_fn = jit_update(cfg, train_cfg, gcfg, self.tx, self.shardings, self.bsh, ref_sh,
                                  trainable=trainable)  # fmt: skip
        self.last: dict = {}

    def meta(self) -> dict:
        g = self.gcfg
        # the prompts as the policy sees them (template applied, truncated to prompt_len): a
        # resume with another chat_template is another prompt stream, refused
        h = hashlib.sha256(repr([(tuple(map(int, e)), p.answer)
                                 for e, p in zip(self.enc, self.prompts)]).encode())  # fmt: skip
        data = {"source": f"prompts:{h.hexdigest()[:16]}", "seq_len": self.seq_len,
                "seed": self.train_cfg.seed}  # fmt: skip
        return meta_dict(self.cfg, self.train_cfg, data,
                         {"posttrain": g.to_dict(), "base": self.base_name})  # fmt: skip

    def host_state(self) -> dict:
        return {}

    def set_host_state(self, state: dict) -> None:
        pass

    def describe(self, state) -> str:
        g = self.gcfg
        return (f"{g.loss_type}: G {g.num_generations} x {g.prompts_per_step} prompts, mu "
                f"{g.num_iterations}, eps {g.epsilon}/{g.epsilon_high_}, beta {g.beta}, "
                f"scale_rewards {g.scale_rewards_}, reward {g.reward}, {len(self.prompts)} "
                "prompts")  # fmt: skip

    def sample(self, params, enc: Sequence[Sequence[int]], key, temperature: float):
        """(completion ids per row (EOS kept), texts (EOS dropped), generated tokens)."""
        return sample_completions(self.cfg, params, self.tokenizer, enc, key,
                                  self.gcfg.max_new_tokens, temperature)  # fmt: skip

    def train_step(self, state, step: int):
        g = self.gcfg
        t0 = time.perf_counter()
        idx = step_indices(len(self.prompts), g.prompts_per_step, self.train_cfg.seed, step)
        rows_idx = [i for i in idx for _ in range(g.num_generations)]
        enc = [self.enc[i] for i in rows_idx]
        with jax.set_mesh(self.mesh):
            key = jax.random.fold_in(self.k_sample, step)
            ids, texts, n_tok = self.sample(state.params, enc, key, g.temperature)
        t_sample = time.perf_counter() - t0
        ps = [self.prompts[i] for i in rows_idx]
        rewards = np.asarray(self.reward([p.prompt for p in ps], texts, [p.answer for p in ps]),
                             np.float32).reshape(-1)  # fmt: skip
        if rewards.shape != (g.rows,):
            raise ConfigError(f"the reward returned shape {rewards.shape}, not ({g.rows},).")
        adv, am = group_advantages(rewards, g.num_generations, g.scale_rewards_)
        batch = completion_rows(enc, ids, self.seq_len)
        batch["advantages"] = np.asarray(adv, np.float32)
        batch = jax.device_put(batch, self.bsh)
        with jax.set_mesh(self.mesh):
            state, m = self.step_fn(state, batch, self.ref, self.rng)
        m = {k: np.asarray(v) for k, v in jax.device_get(m).items()}
        dt = time.perf_counter() - t0
        self.step_times.append(dt)
        m.update({k: np.asarray(v) for k, v in jax.device_get(am).items()})
        m.update(completion_length=np.float32(n_tok / g.rows), tokens=np.float32(n_tok),
                 sample_time_share=np.float32(t_sample / dt),
                 sampler_tokens_per_s=np.float32(n_tok / max(t_sample, 1e-9)))  # fmt: skip
        m["clip_ratio"] = m.pop("clip_ratio/region_mean")
        m["clip_low"] = m.pop("clip_ratio/low_mean")
        m["clip_high"] = m.pop("clip_ratio/high_mean")
        self.last = {"idx": idx, "sample_hash": hashlib.sha256(repr(ids).encode()).hexdigest()[:16],
                     "reward_hex": float(rewards.mean()).hex()}  # fmt: skip
        return state, m

    def step_record(self, step: int, metrics: dict, state) -> dict:
        return {"step": step, "loss_hex": float(metrics["loss"]).hex(),
                "params_hash": params_hash(state.params), "prompt_ids": self.last.get("idx"),
                "sample_hash": self.last.get("sample_hash"),
                "reward_hex": self.last.get("reward_hex")}  # fmt: skip

    def evaluate(self, state, step: int) -> dict:
        if not self.eval_prompts:
            return {}
        g, ps = self.gcfg, self.eval_prompts
        rewards, lengths = [], []
        with jax.set_mesh(self.mesh):
            for s in range(0, len(ps), g.eval_batch_size):
                chunk = ps[s : s + g.eval_batch_size]
                enc = self.enc_eval[s : s + g.eval_batch_size]
                ids, texts, _ = self.sample(state.params, enc, jax.random.key(0), 0.0)
                r = self.reward([p.prompt for p in chunk], texts, [p.answer for p in chunk])
                rewards += list(np.asarray(r, np.float64).reshape(-1))
                lengths += [len(x) for x in ids]
        return {"eval/reward": float(np.mean(rewards)),
                "eval/completion_length": float(np.mean(lengths))}  # fmt: skip

    def final_evaluate(self, state, step: int) -> dict:
        out = self.evaluate(state, step)
        self.export_peft(state)
        return out


# --------------------------------------------------------------------------- entry points


def posttrain(base_cfg: ModelConfig, params, tokenizer, prompts: Sequence[Prompt],
              reward: RewardFn, train_cfg: TrainConfig, gcfg: GRPOConfig, *,
              eval_prompts: Sequence[Prompt] = (), base_name: str | None = None, mesh=None,
              log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Train (or resume in `train_cfg.workdir`) GRPO on `prompts` through the one loop; returns
    {model_config, params, state, stats, history, final, resumed_from, method}."""
    mesh = make_mesh(train_cfg.mesh) if mesh is None else mesh
    eval_prompts = list(eval_prompts)[: gcfg.eval_examples or None]
    check_batching(mesh, train_cfg, gcfg.rows, gcfg.eval_batch_size if eval_prompts else gcfg.rows,
                   gcfg.prompt_len + gcfg.max_new_tokens, base_cfg.max_len,
                   rows="prompts_per_step * num_generations")  # fmt: skip
    cfg, params, trainable = prepare_model(base_cfg, params, gcfg, train_cfg.seed)
    task = GRPOTask(cfg, params, trainable, tokenizer, prompts, reward, train_cfg, gcfg,
                    mesh=mesh, eval_prompts=eval_prompts, base_name=base_name, log=log)  # fmt: skip
    del params
    res, out = run_tuning(task, cfg, tokenizer, train_cfg, gcfg, len(prompts), log)
    for k in ("sample_time_share", "sampler_tokens_per_s"):  # medians over the logged steps
        vals = [r[f"train/{k}"] for r in res.history if f"train/{k}" in r]
        if vals:
            out["stats"][k] = float(np.median(vals))
    return {**out, "method": "grpo"}


def run(*, checkpoint: str = "", hf_dir: str = "", gguf: str = "", prompts: Sequence[Prompt],
        eval_prompts: Sequence[Prompt] = (), reward: Callable[[object], RewardFn],
        gcfg: GRPOConfig, train_cfg: TrainConfig, data: str = "",
        log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """The post-training binary's GRPO: load the model (default SmolLM2-135M-Instruct), make the
    reward (`reward(tokenizer)`), `posttrain`; returns its report."""
    if not (checkpoint or hf_dir or gguf):
        gguf = ft_lib.default_gguf()
    cfg, params, tok, name = ft_lib.load_source(checkpoint, hf_dir, gguf)
    check_model(cfg, params, gcfg)
    reward_fn = reward(tok)
    log(f"model {name}: {cfg.num_layers} layers, d_model {cfg.d_model}; {len(prompts)} prompts, "
        f"{len(eval_prompts)} held out")  # fmt: skip
    out = posttrain(cfg, params, tok, prompts, reward_fn, train_cfg, gcfg,
                    eval_prompts=eval_prompts, base_name=name, log=log)  # fmt: skip
    return {"method": "grpo", "data": data, "model": name, **out["stats"], **out["final"]}
