r"""Distributional alignment (GDC / DPG and baselines) of a pretrained LM.

  python experiments/align.py --base=/tmp/shakespeare --constraint=word:love \
      --method=dpg,reinforce --steps=100 --workdir=/tmp/align
  python experiments/align.py --base=model.gguf --constraint=word:she=0.5 --method=kl_dpg

--base: an lm_jax training workdir, a Hugging Face model folder, or a .gguf file.
Metrics go to <workdir>/<method>/metrics.jsonl + TensorBoard; <workdir>/align.png plots
E_pi[phi] and KL(pi||a) per method against the floor KL(p||a).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

flags.DEFINE_string("base", None, "Checkpoint workdir, HF model dir or .gguf file.", required=True)
flags.DEFINE_multi_string("constraint", [], "word:W, regex:R (pointwise) or word:W=0.5 (moment).")
flags.DEFINE_list("method", ["dpg"], "dpg, kl_dpg, fdpg_{fkl,rkl,tv,js,chi2}, reinforce, kl_pg.")
flags.DEFINE_integer("steps", 100, "Gradient steps per method.")
flags.DEFINE_integer("batch_size", 64, "Samples per step.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"], "cosine: to lr*min_lr_ratio.")
flags.DEFINE_float("min_lr_ratio", 0.1, "Final lr / lr for --lr_schedule=cosine.")
flags.DEFINE_integer("lora_rank", 8, "LoRA rank; 0 = full-parameter policy.")
flags.DEFINE_integer("max_new_tokens", 40, "Sampled continuation length.")
flags.DEFINE_string("prompt", "\n", "Text every sample continues.")
flags.DEFINE_integer("moment_samples", 2048, "Base samples for lambda and Z.")
flags.DEFINE_integer("eval_every", 25, "Steps between evaluations (0 = never).")
flags.DEFINE_integer("eval_samples", 256, "Policy samples per evaluation.")
flags.DEFINE_integer(
    "kl_adaptive_every", 10, "kl_dpg: steps between proposal checks (huge = fixed proposal a)."
)
flags.DEFINE_float(
    "moment_feedback", 0.0, "Moment targets: lambda += rate (mu_bar - E_pi[phi]) per step; 0 = off."
)
flags.DEFINE_string("mesh", "", "e.g. data:8 (default: all devices on data).")
flags.DEFINE_string("workdir", "/tmp/align", "Output folder.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("logits_chunk", 0, "> 0: log-probs with the LM head N positions at a time.")


def main(argv):
    import jax
    import optax

    from lm_jax.align import TunerConfig, parse_constraint
    from lm_jax.align.loop import estimate_target, load_base, plot_histories, train
    from lm_jax.align.moments import check_moment_feedback
    from lm_jax.align.policies import make_lm_policy
    from lm_jax.align.samplers import SamplerConfig
    from lm_jax.nn.lora import LoraConfig
    from lm_jax.optim import policy_lr_schedule
    from lm_jax.sharding import make_mesh
    from lm_jax.train.metrics import MetricWriter

    F = flags.FLAGS
    if len(argv) > 1 or not F.constraint:
        raise app.UsageError("give at least one --constraint (and no positional arguments)")
    tuner = lambda m: TunerConfig(m, kl_adaptive_every=F.kl_adaptive_every)  # noqa: E731
    methods = [tuner(m).method for m in F.method]  # validates names before any work
    policy_lr_schedule(F.lr, F.steps, F.lr_schedule, F.min_lr_ratio)  # and the schedule
    cfg, params, tok = load_base(F.base)
    cons = [parse_constraint(s, tok) for s in F.constraint]
    for m in methods:  # before any sampling
        check_moment_feedback(F.moment_feedback, cons, tuner(m))
    stop = () if tok.eos_id is None else (tok.eos_id,)
    scfg = SamplerConfig(F.max_new_tokens, stop, tuple(tok.encode(F.prompt)))
    lora = LoraConfig(rank=F.lora_rank, alpha=2.0 * F.lora_rank) if F.lora_rank else None
    policy_args = (cfg, params, scfg, lora, F.seed, F.logits_chunk)
    mesh, key = make_mesh(F.mesh), jax.random.key(F.seed)
    histories = {}
    with jax.set_mesh(mesh):
        policy, _, frozen = make_lm_policy(*policy_args)
        *target, ref = estimate_target(
            policy, frozen, cons, key, F.moment_samples, F.batch_size, return_samples=True
        )
        summary = {"target": target[1], "methods": {}}
        kw = dict(steps=F.steps, batch_size=F.batch_size, key=key, target=tuple(target), mesh=mesh)
        kw.update(tokenizer=tok, eval_every=F.eval_every, eval_samples=F.eval_samples)
        kw.update(reference=ref, moment_feedback=F.moment_feedback)
        for m in methods:
            policy, trainable, frozen = make_lm_policy(*policy_args)
            writer = MetricWriter(os.path.join(F.workdir, m))
            tx = optax.adam(policy_lr_schedule(F.lr, F.steps, F.lr_schedule, F.min_lr_ratio))
            _, hist = train(policy, trainable, frozen, cons, tuner(m), tx, **kw, writer=writer)
            writer.close()
            histories[m] = hist
            ev = [h for h in hist if "eval/kl_pi_a" in h]
            summary["methods"][m] = ev[-1] if ev else hist[-1]
    plot_histories(histories, target[1]["kl_p_a"], os.path.join(F.workdir, "align.png"))
    with open(os.path.join(F.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    try:
        app.run(main)
    except Exception as e:  # bad input: one clear line, exit 2
        from lm_jax.align import FeatureError, MomentError
        from lm_jax.errors import USER_ERRORS

        if isinstance(e, (*USER_ERRORS, FeatureError, MomentError)):
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(2)
        raise
