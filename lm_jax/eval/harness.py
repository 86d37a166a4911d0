r"""lm_jax as an lm-evaluation-harness backend (`lm_eval.api.model.LM`, registered as `lm_jax`).

  python -m lm_jax.eval.harness run --model lm_jax --model_args gguf=<SmolLM2.gguf> \
      --tasks lm_jax_bigbench_truthful_qa --bigbench_tasks truthful_qa --batch_size 16
  python -m lm_jax.eval.harness run --model lm_jax \
      --model_args checkpoint=runs/x,mesh=data:8 --tasks <any lm-eval task>

`python -m lm_jax.eval.harness` is lm-eval's own command line (every lm-eval flag works) with
the `lm_jax` model registered first; `--bigbench_tasks a,b` (ours) writes local task configs for
those BIG-bench folders (`lm_jax.eval.bigbench`, from `--bigbench_dir`, default
../shared/data/bigbench) and adds them to `--include_path`. In Python, importing this module
registers the backend for `lm_eval.simple_evaluate(model="lm_jax", ...)`.

model_args: exactly one of `gguf=`, `checkpoint=` (an lm_jax workdir), `hf_dir=`; optional
`mesh=` (e.g. data:8; rows are split over the data axes), `max_length=`, `add_bos_token=`
(default: True for Gemma-family models, as lm-eval's `hf` backend), `logits_chunk=`.
Requests go through `lm_jax.eval.loglikelihood` (the one scorer) and `lm_jax.generate` (the
one sampler): loglikelihood, loglikelihood_rolling and generate_until.
"""

from __future__ import annotations

import os
import sys

import jax
import lm_eval.models  # noqa: F401  (lm-eval's own backends first: its registry loads them only when empty)
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from lm_jax.eval import loglikelihood as ll_lib
from lm_jax.eval.tasks import DEFAULT_DATA_DIR, load_model
from lm_jax.generate import generate
from lm_jax.scoring import Scorer
from lm_jax.sharding import make_mesh


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("lm_jax")
class LmJaxLM(TemplateLM):
    """lm-eval `LM` over an lm_jax model: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(
        self,
        gguf: str = "",
        checkpoint: str = "",
        hf_dir: str = "",
        batch_size=16,
        max_length=None,
        add_bos_token=None,
        mesh: str = "",
        logits_chunk=0,
        max_gen_toks: int = 256,
        **_ignored,  # lm-eval passes device / max_batch_size: the mesh decides placement here
    ):
        super().__init__()
        m = load_model(checkpoint, hf_dir, gguf)
        self.cfg, self.params, self.tok, self.name = m.cfg, m.params, m.tokenizer, m.name
        self.mesh = make_mesh(mesh) if mesh else None
        self.scorer = Scorer(self.cfg, self.params, self.mesh, chunk=int(logits_chunk))
        self._batch = int(batch_size) if str(batch_size).isdigit() else 16
        self._max_length = int(max_length) if max_length else int(self.cfg.max_len)
        family = str(getattr(self.cfg, "family", "") or self.name).lower()
        default_bos = "gemma" in family
        self.add_bos = default_bos if add_bos_token is None else _bool(add_bos_token)
        self.max_gen_toks = int(max_gen_toks)

    # ----------------------------------------------------------------- TemplateLM plumbing
    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tok, "eos_id", None)
        return ll_lib.prefix_token(self.tok) if eos is None else int(eos)

    @property
    def prefix_token_id(self) -> int:
        return ll_lib.prefix_token(self.tok)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        add = self.add_bos if add_special_tokens is None else bool(add_special_tokens)
        return ll_lib.encode(self.tok, string, add)

    def _encode_pair(self, context: str, continuation: str):
        return ll_lib.encode_pair(self.tok, context, continuation, self.add_bos)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        out = ll_lib.score_token_pairs(self.scorer, self.max_length, pairs, self._batch)
        for (key, _, _), res in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    # ----------------------------------------------------------------- the three request kinds
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        out = ll_lib.rolling_loglikelihood(
            self.scorer, self.tok, self.max_length, texts, self._batch, self.add_bos
        )
        for t, v in zip(texts, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), v)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, `do_sample`/`temperature`) continuations cut at the first
        `until` string, batched by equal generation settings."""
        results: list[str | None] = [None] * len(requests)
        groups: dict = {}
        for i, r in enumerate(requests):
            ctx, kw = r.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temp = float(kw.pop("temperature", 0.0) or 0.0)
            if not _bool(kw.pop("do_sample", temp > 0)):
                temp = 0.0  # greedy, as lm-eval's hf backend without do_sample
            groups.setdefault((tuple(until), n_new, temp), []).append((i, ctx))
        eos = getattr(self.tok, "eos_id", None)
        for (until, n_new, temp), items in groups.items():
            for start in range(0, len(items), self._batch):
                chunk = items[start : start + self._batch]
                keep = max(self.max_length - n_new, 1)
                ids = [self.tok_encode(c)[-keep:] or [self.prefix_token_id] for _, c in chunk]
                out = generate(
                    self.cfg, self.params, ids, jax.random.key(start), n_new,
                    temperature=temp,
                    stop_tokens=() if eos is None else (int(eos),),
                )  # fmt: skip
                toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
                for j, (i, ctx) in enumerate(chunk):
                    row = [int(t) for t in toks[j, : lens[j]] if eos is None or t != eos]
                    text = self.tok.decode(row)
                    for u in until:
                        if u and u in text:
                            text = text.split(u)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (ctx, requests[i].args[1]), text)
        return results  # type: ignore[return-value]


def _pop_flag(argv: list[str], name: str, default: str = "") -> str:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            v = argv[i + 1]
            del argv[i : i + 2]
            return v
        if a.startswith(name + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return default


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the `lm_jax` backend registered (and `--bigbench_tasks`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [n for n in _pop_flag(argv, "--bigbench_tasks").split(",") if n]
    root = _pop_flag(argv, "--bigbench_dir", os.path.join(DEFAULT_DATA_DIR, "bigbench"))
    if names:
        from lm_jax.eval.bigbench import write_lm_eval_tasks

        out_dir = _pop_flag(argv, "--bigbench_out", os.path.join("runs", "lm_eval_tasks"))
        write_lm_eval_tasks(root, names, out_dir)
        inc = _pop_flag(argv, "--include_path")
        argv += ["--include_path", out_dir if not inc else f"{inc}:{out_dir}"]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + argv
    cli_evaluate()


if __name__ == "__main__":
    main()
