r"""Tables (markdown) and a combined plot from experiments/align.py workdirs.

  python -m benchmarks.align_lm_summary --runs=/tmp/align_thou --plot=benchmarks/align_lm.png
  python -m benchmarks.align_lm_summary --runs=fixed=/tmp/a/kl_dpg,adaptive=/tmp/b/kl_dpg

--runs: workdirs (every method folder in them) or NAME=METHOD_DIR pairs.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

flags.DEFINE_list("runs", [], "Workdirs or name=method_dir.")
flags.DEFINE_string("plot", "", "Write E_pi[phi] / KL(pi||a) curves here.")


def _rows(path, file=None):
    with open(file or os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _collect(specs):
    runs = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if eq:
            runs[name] = (path, os.path.dirname(path.rstrip("/")))
            continue
        for m in sorted(os.listdir(spec)):
            if os.path.isfile(os.path.join(spec, m, "metrics.jsonl")):
                runs[m] = (os.path.join(spec, m), spec)
    return runs


def main(_):
    from lm_jax.align.loop import plot_histories

    F = flags.FLAGS
    runs, hists, floors = _collect(F.runs), {}, {}
    print(
        "| method | steps x batch | E_pi[phi] | KL(pi‖a) | / -log Z^ | KL(p‖pi) | TVD(p, pi) "
        "| Distinct-2 (base -> final) | Self-BLEU (base -> final) | wall min |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    base_eval = {}  # a workdir's step-0 evaluation (the base model), for the baselines
    for path, workdir in runs.values():
        ev = [r for r in _rows(path) if "eval/kl_pi_a" in r]
        if ev and ev[0]["step"] == 0:
            base_eval.setdefault(workdir, ev[0])
    for name, (path, workdir) in runs.items():
        rows = _rows(path)
        full = json.load(open(os.path.join(workdir, "summary.json")))
        summ = full["target"]
        floor = floors[name] = summ["kl_p_a"]
        ev = [r for r in rows if "eval/kl_pi_a" in r]
        steps = max(r["step"] for r in rows)
        seg = os.path.join(path, "policy_eval.jsonl")  # dpo / grpo run with eval_every
        if not ev and os.path.isfile(seg):
            ev = _rows(path, seg)
            rows = rows + ev
        if not ev:  # dpo / grpo: scored once, at the end (summary.json), beside the base
            final = {"step": steps, **full["methods"][os.path.basename(path.rstrip("/"))]}
            ev = [base_eval[workdir], final] if workdir in base_eval else [final]
            rows = rows + [final]  # plotted as one point at the end
        a, z = ev[0], ev[-1]
        wall = max(r.get("wall_s", 0.0) for r in rows)
        print(
            f"| {name} | {steps} | {z['eval/phi_pi'][0]:.3f} | {z['eval/kl_pi_a']:.2f} "
            f"| {z['eval/kl_pi_a'] / floor:.2f} | {z.get('eval/kl_p_pi', float('nan')):.2f} "
            f"| {z.get('eval/tvd_p_pi', float('nan')):.3f} "
            f"| {a['eval/distinct_2']:.3f} -> {z['eval/distinct_2']:.3f} "
            f"| {a.get('eval/self_bleu', 0):.1f} -> {z.get('eval/self_bleu', 0):.1f} "
            + (f"| {wall / 60:.1f} |" if wall else "| |")
        )
        print(
            f"  target {summ}; eval rows:",
            [(r["step"], round(r["eval/phi_pi"][0], 3), round(r["eval/kl_pi_a"], 2)) for r in ev],
        )
        hists[name] = rows
    if F.plot and hists:
        plot_histories(hists, floors, F.plot)  # one floor line per target if they differ


if __name__ == "__main__":
    app.run(main)
