"""peft LoRA folders <-> lm_jax adapters: logits match `PeftModel` (GPT-2 fused c_attn, Llama)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lm_jax import adapters as L  # noqa: E402
from lm_jax.adapters.tree import _key, _unbox  # noqa: E402
from lm_jax.convert.peft import load_peft_adapters, save_peft_adapters  # noqa: E402
from lm_jax.errors import ConfigError  # noqa: E402
from lm_jax.nn import Transformer  # noqa: E402

TOL = 1e-4
TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _from_hf(model):
    from lm_jax.convert import from_hf

    cfg, params = from_hf(model)
    return cfg, jax.tree.map(jnp.asarray, params)


def _hf_model(arch):
    torch.manual_seed(0)
    if arch == "gpt2":
        c = transformers.GPT2Config(
            vocab_size=61,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(c)
    else:
        c = transformers.LlamaConfig(
            vocab_size=61,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = transformers.LlamaForCausalLM(c)
    return model.eval()


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def _ours(cfg, params, lora_cfg, adapters, tokens):
    return np.asarray(
        Transformer(cfg.replace(lora=lora_cfg)).apply(
            {"params": L.combine(params, adapters)}, tokens
        )
    )


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tmp_path_factory):
    arch = request.param
    base = _hf_model(arch)
    cfg, params = _from_hf(base)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    return arch, base, cfg, params, tokens, tmp_path_factory.mktemp(arch)


def test_import_peft_adapter_matches_peft_model(setup):
    arch, base, cfg, params, tokens, tmp = setup
    pcfg = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS[arch], fan_in_fan_out=arch == "gpt2"
    )
    model = peft.get_peft_model(copy.deepcopy(base), pcfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(str(tmp / "peft"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "peft")).eval()
    ref = _torch_logits(loaded, tokens)
    assert np.abs(ref - _torch_logits(base, tokens)).max() > 1e-3  # the adapter does something

    lora_cfg, adapters = load_peft_adapters(str(tmp / "peft"), cfg)
    assert (lora_cfg.rank, lora_cfg.scale) == (8, 2.0)
    assert L.check_targets(cfg.replace(lora=lora_cfg), L.combine(params, adapters))
    diff = np.abs(_ours(cfg, params, lora_cfg, adapters, tokens) - ref).max()
    assert diff <= TOL, diff

    # ...and written back, peft loads the same adapter (GPT-2: shared A -> rank r, no blocks)
    written = save_peft_adapters(str(tmp / "back"), adapters, cfg.replace(lora=lora_cfg))
    assert written["rank_pattern"] == {}
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "back")).eval()
    diff = np.abs(_torch_logits(again, tokens) - ref).max()
    assert diff <= TOL, diff


def test_export_lm_jax_adapter_loads_in_peft(setup):
    arch, base, cfg, params, tokens, tmp = setup
    # Our own adapters: separate (different) A for q, k, v -> GPT-2 needs the block export.
    lora_cfg = L.LoraConfig(rank=8, alpha=16.0, rslora=arch == "llama")
    lcfg = cfg.replace(lora=lora_cfg)
    init = Transformer(lcfg).init(jax.random.key(3), tokens)["params"]
    _, adapters = L.split_lora(jax.tree.map(np.asarray, _unbox(init)))
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    adapters = jax.tree.unflatten(
        tree,
        [
            0.05 * np.asarray(jax.random.normal(k, x.shape)) if _key(p[-1]) == "lora_b" else x
            for k, (p, x) in zip(keys, leaves, strict=True)
        ],
    )
    ours = _ours(cfg, params, lora_cfg, adapters, tokens)
    written = save_peft_adapters(str(tmp / "export"), adapters, lcfg, base_model_name_or_path=arch)
    if arch == "gpt2":
        assert written["rank_pattern"] == {"attn.c_attn": 24}
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "export")).eval()
    diff = np.abs(_torch_logits(model, tokens) - ours).max()
    assert diff <= TOL, diff
    assert np.abs(ours - _torch_logits(base, tokens)).max() > 1e-3

    # re-import (per-module rank via rank_pattern -> zero padding) reproduces the model
    back_cfg, back = load_peft_adapters(str(tmp / "export"), cfg)
    diff = np.abs(_ours(cfg, params, back_cfg, back, tokens) - ours).max()
    assert diff <= TOL, diff


def test_unsupported_peft_settings_are_errors(tmp_path):
    base = _hf_model("llama")
    cfg, _ = _from_hf(base)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    peft.get_peft_model(copy.deepcopy(base), pcfg).save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(ConfigError, match="use_dora"):
        load_peft_adapters(str(tmp_path / "dora"), cfg)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapters(str(tmp_path), cfg)
