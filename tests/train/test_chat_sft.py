"""Multi-turn chat SFT (lm_jax/train/chat_data.py): rendering equals transformers'
`apply_chat_template(tokenize=True)` (SmolLM2's own template from its GGUF, and the built-in
ones on a small trained tokenizer), the loss mask is exactly the assistant turns (content + end
marker, HF's `{% generation %}` assistant mask), packed rows give every conversation the loss it
has alone, the readers (messages JSONL, topical_chat) and their one-line errors, and a short
packed chat fine-tune on the one loop."""

import gzip
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_jax.configs import ConfigError, llama_style
from lm_jax.configs.train import TrainConfig
from lm_jax.convert.gguf import gguf_tokenizer, smollm2_gguf_path
from lm_jax.data.byte_tokenizer import ByteTokenizer
from lm_jax.data.chat_template import BUILTIN_TEMPLATES, render_chat, resolve_template
from lm_jax.data.hf_tokenizer import HFTokenizer
from lm_jax.nn import Transformer
from lm_jax.scoring import score
from lm_jax.train import chat_data as C
from lm_jax.train import finetune as F

M = C.Message
CONV = (
    M("system", "You answer in one short line."),
    M("user", "Hi! Who are you?"),
    M("assistant", "A small model, trained to chat."),
    M("user", "What is 2 + 2?"),
    M("assistant", "It is 4."),
    M("user", "And in words?"),
    M("assistant", "Four."),
)
NO_SYSTEM = CONV[1:5]
OPENS_WITH_ASSISTANT = (M("assistant", "Hello there."), M("user", "Hi."), M("assistant", "Bye."))
SPECIALS = ["<|endoftext|>", "<bos>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>",
            "<end_of_turn>"]  # fmt: skip
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}
# ChatML with transformers' assistant-mask markers: the generation block is content + end marker
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
)


def dicts(conv):
    return [{"role": m.role, "content": m.content} for m in conv]


def hf_ids(out):
    """transformers' apply_chat_template(tokenize=True) result -> ids (v4 list, v5 dict)."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def small():
    """(HFTokenizer, transformers tokenizer) from one small BPE trained here, with the markers of
    every built-in template as special tokens."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator([m.content for m in CONV] * 20 + ["user assistant system"] * 20,
                           trainer)  # fmt: skip
    ours = HFTokenizer(tk, bos_id=tk.token_to_id("<bos>"), eos_id=tk.token_to_id("<|endoftext|>"))
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>",
                                                  eos_token="<|endoftext|>")  # fmt: skip
    return ours, theirs


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer and chat template from its GGUF: ours and transformers'."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return gguf_tokenizer(path), theirs


# ---------------------------------------------------------------- rendering parity


@pytest.mark.parametrize("conv", [CONV, NO_SYSTEM, OPENS_WITH_ASSISTANT],
                         ids=["system", "default_system", "assistant_first"])  # fmt: skip
def test_smollm2_own_template_ids_equal_transformers(smollm2, conv):
    ours, theirs = smollm2
    assert ours.chat_template and ours.chat_template == theirs.chat_template
    enc = C.ChatEncoder(ours, resolve_template("", ours), seq_len=512)
    ids, _ = enc.encode_full(conv)
    want = hf_ids(theirs.apply_chat_template(dicts(conv), tokenize=True))
    assert ids.tolist() == want
    assert enc.render(conv) == theirs.apply_chat_template(dicts(conv), tokenize=False)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_template_ids_equal_transformers(small, name):
    ours, theirs = small
    source = resolve_template(name, ours)
    ids, _ = C.ChatEncoder(ours, source, seq_len=512).encode_full(CONV)
    want = hf_ids(theirs.apply_chat_template(dicts(CONV), chat_template=source, tokenize=True))
    assert ids.tolist() == want
    # and the generation prompt, as generation would use it
    text = render_chat(source, dicts(CONV[:2]), add_generation_prompt=True, bos_token="<bos>")
    assert text == theirs.apply_chat_template(
        dicts(CONV[:2]), chat_template=source, tokenize=False, add_generation_prompt=True
    )


def test_hf_tokenizer_apply_chat_template_renders_through_the_shared_renderer(small):
    ours, _ = small
    ours = HFTokenizer(ours.tk, ours.bos_id, ours.eos_id, chat_template=CHATML_GENERATION)
    text = ours.apply_chat_template(dicts(CONV), add_generation_prompt=False)  # generation tags
    assert text == render_chat(BUILTIN_TEMPLATES["chatml"].source, dicts(CONV))


# ---------------------------------------------------------------- the loss mask


def masked_runs(tok, ids, mask) -> list[str]:
    """The decoded text of each run of consecutive masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs, cur = runs + [tok.decode(cur)], []
    return runs + ([tok.decode(cur)] if cur else [])


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_mask_is_exactly_each_assistant_turn_and_its_end_marker(small, name):
    ours, _ = small
    ids, mask = C.ChatEncoder(ours, resolve_template(name, ours), 512).encode_full(CONV)
    want = [m.content + END[name] for m in CONV if m.role == "assistant"]
    assert masked_runs(ours, ids, mask) == want


def test_mask_equals_transformers_assistant_mask(smollm2):
    ours, theirs = smollm2
    for conv in (CONV, NO_SYSTEM, OPENS_WITH_ASSISTANT):
        ids, mask = C.ChatEncoder(ours, BUILTIN_TEMPLATES["chatml"].source, 512).encode_full(conv)
        out = theirs.apply_chat_template(dicts(conv), chat_template=CHATML_GENERATION,
                                         tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)  # fmt: skip
        assert ids.tolist() == list(out["input_ids"])
        assert mask.astype(int).tolist() == list(out["assistant_masks"])


def test_smollm2_mask_skips_its_default_system_prompt(smollm2):
    ours, _ = smollm2
    enc = C.ChatEncoder(ours, ours.chat_template, 512)
    for conv in (NO_SYSTEM, OPENS_WITH_ASSISTANT):
        ids, mask = enc.encode_full(conv)
        want = [m.content + "<|im_end|>" for m in conv if m.role == "assistant"]
        assert masked_runs(ours, ids, mask) == want
    ids, target_mask = enc.encode(CONV)  # rows: the mask moves to the targets
    want = [m.content + "<|im_end|>" for m in CONV if m.role == "assistant"]
    assert masked_runs(ours, ids[1:], target_mask) == want


def test_loss_turns_last(small):
    ours, _ = small
    enc = C.ChatEncoder(ours, resolve_template("chatml", ours), 512, loss_turns="last")
    ids, mask = enc.encode_full(CONV)
    assert masked_runs(ours, ids, mask) == ["Four.<|im_end|>"]


class MergingTokenizer:
    """Characters, except that "\\n\\n" is one token: a token can straddle a turn boundary."""

    vocab_size = 0x110000

    def encode(self, text):
        out, i = [], 0
        while i < len(text):
            if text.startswith("\n\n", i):
                out, i = out + [0], i + 2
            else:
                out, i = out + [ord(text[i])], i + 1
        return out

    def decode(self, ids):
        return "".join("\n\n" if i == 0 else chr(i) for i in ids)


def test_a_token_straddling_the_turn_start_counts_as_the_assistants():
    conv = (M("user", "hi"), M("assistant", "\nyo"))  # "assistant\n" + "\nyo": "\n\n" straddles
    ids, mask = C.ChatEncoder(MergingTokenizer(), BUILTIN_TEMPLATES["chatml"].source,
                              512).encode_full(conv)  # fmt: skip
    assert masked_runs(MergingTokenizer(), ids, mask) == ["\n\nyo<|im_end|>"]


def test_long_conversations_lose_their_oldest_exchanges_then_their_end(small):
    ours, _ = small
    source = resolve_template("chatml", ours)
    rows = lambda seq_len: C.ChatEncoder(ours, source, seq_len).encode(CONV)  # noqa: E731
    n = len(C.ChatEncoder(ours, source, 512).encode_full(CONV)[0])
    last = len(C.ChatEncoder(ours, source, 512).encode_full(CONV[:1] + CONV[-2:])[0])
    ids, tmask = rows(n - 2)  # one exchange less is enough
    assert masked_runs(ours, ids[1:], tmask) == ["It is 4.<|im_end|>", "Four.<|im_end|>"]
    ids, tmask = rows(last - 1)  # room for the system message and the last exchange only
    assert len(ids) == last and ours.decode(ids.tolist()).startswith("<|im_start|>system\nYou")
    assert masked_runs(ours, ids[1:], tmask) == ["Four.<|im_end|>"]
    ids, tmask = rows(last - 3)  # even that is too long: its end is cut
    (run,) = masked_runs(ours, ids[1:], tmask)
    assert len(ids) == last - 2 and run and "Four.<|im_end|>".startswith(run)
    assert rows(8) is None  # not one assistant token fits: skipped


# ---------------------------------------------------------------- packing

CFG = llama_style(vocab_size=400, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_len=256, initializer_range=0.2)  # fmt: skip


def params(seed=0):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.device_get(nn.unbox(Transformer(CFG).init(jax.random.key(seed), tokens)["params"]))


def conversations(n):
    """`n` two-exchange conversations of different lengths."""
    return [
        (M("user", f"q{i} " + "x" * (i % 5)), M("assistant", f"a{i} " + "y" * (i % 7)),
         M("user", "more?"), M("assistant", "done " * (1 + i % 3)))
        for i in range(n)
    ]  # fmt: skip


def test_packed_rows_give_each_conversation_its_unpacked_loss(small):
    ours, _ = small
    enc = C.ChatEncoder(ours, resolve_template("chatml", ours), 96)
    rows = [enc.encode(c) for c in conversations(9)]
    ft = F.FinetuneConfig(seq_len=160, batch_size=3, pack=True)
    it = F.PackedSFTBatches(rows, ft, seed=1)
    packed = next(it)
    assert all(len(r) >= 2 for r in it.last_rows)  # several conversations per row
    p = params()
    got = np.asarray(score(CFG, p, jax.tree.map(jnp.asarray, packed)).token_logprobs, np.float64)
    order = [k for row in it.last_rows for k in row]
    alone = F.make_batch([rows[k] for k in order], 160)
    want = np.asarray(score(CFG, p, jax.tree.map(jnp.asarray, alone)).token_logprobs, np.float64)
    r = 0
    for b, row in enumerate(it.last_rows):
        for j in range(1, len(row) + 1):
            seg = packed["segment_ids"][b] == j
            assert packed["positions"][b][seg].tolist() == list(range(int(seg.sum())))
            mask = packed["loss_mask"][b][seg]
            assert np.array_equal(mask, alone["loss_mask"][r][: seg.sum()]) and mask.sum() > 3
            lp, lp_alone = got[b][seg] * mask, want[r][: seg.sum()] * mask
            np.testing.assert_allclose(lp, lp_alone, rtol=0, atol=1e-5)  # every token
            loss, loss_alone = -lp.sum() / mask.sum(), -lp_alone.sum() / mask.sum()
            assert abs(loss - loss_alone) < 1e-5 and loss > 1.0  # the conversation's SFT loss
            r += 1


def test_packed_batches_resume_and_visit_every_conversation_once_per_epoch():
    rows = [(np.arange(n + 2, dtype=np.int32), 1) for n in [5, 9, 3, 12, 7, 2, 8, 4, 6, 10]]
    ft = F.FinetuneConfig(seq_len=16, batch_size=2, pack=True)
    a = F.PackedSFTBatches(rows, ft, seed=3)
    seen, batches = [], []
    for _ in range(6):
        batches.append(next(a))
        seen += a.last_indices
        for row in a.last_rows:
            assert sum(len(rows[j][0]) - 1 for j in row) <= 16
        if len(batches) == 2:
            state = a.get_state()
    assert sorted(seen[:10]) == list(range(10))
    b = F.PackedSFTBatches(rows, ft, seed=3)
    b.set_state(json.loads(json.dumps(state)))
    for want in batches[2:]:
        got = next(b)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(ConfigError, match=r"made with packing.*--finetune\.pack=true"):
        F.SFTBatches(rows, ft, seed=3).set_state(state)
    with pytest.raises(ConfigError, match=r"without packing"):
        b.set_state({"epoch": 0, "index": 0, "seed": 3})


# ---------------------------------------------------------------- readers and errors


def test_messages_jsonl_and_specs(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": dicts(CONV)}) + "\n\n"
                    + json.dumps({"messages": dicts(NO_SYSTEM), "id": 7}) + "\n")  # fmt: skip
    for spec in (str(path), f"jsonl:{path}"):
        assert C.load_conversations(spec) == [CONV, NO_SYSTEM]
    assert C.load_conversations(str(path), limit=1) == [CONV]
    with pytest.raises(ConfigError, match=r"give <path>\.jsonl, jsonl:<path> or topical_chat"):
        C.load_conversations("nope:/x")


BAD = {
    "unknown_role": ([{"role": "robot", "content": "x"}], r":2: message 0 has role 'robot'"),
    "no_assistant": ([{"role": "user", "content": "x"}], r":2: no assistant turn"),
    "late_system": (dicts(CONV[1:3]) + [{"role": "system", "content": "x"}], r"message 2 is a sys"),
    "content_not_str": ([{"role": "assistant", "content": 3}], r"'content' must be a string"),
    "empty_assistant": ([{"role": "assistant", "content": " "}], r"assistant turn is empty"),
    "not_a_list": ("hello", r"'messages' must be a non-empty list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_conversations_name_the_line_and_the_fix(tmp_path, case):
    messages, pattern = BAD[case]
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": dicts(CONV)})
    path.write_text(good + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ConfigError, match=pattern) as e:
        C.read_messages(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_topical_chat_examples_become_conversations(tmp_path, shared_data):
    task = {"examples": [
        {"input": 'agent_A: "Do you like jazz?"', "target": '"I do!"'},
        {"input": 'agent_B: "Hi" agent_A: "Hey, \\"pal\\"\n"', "target": ['"Bye"']},
    ]}  # fmt: skip
    path = tmp_path / "task.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(task, f)
    convs = C.load_conversations(f"topical_chat:{path}")
    assert convs == [
        (M("user", "Do you like jazz?"), M("assistant", "I do!")),
        (M("assistant", "Hi"), M("user", 'Hey, \\"pal\\"'), M("assistant", "Bye")),
    ]
    real = C.read_topical_chat(str(shared_data / "topical_chat" / "task.json.gz"))
    assert len(real) > 20000 and all(c[-1].role == "assistant" for c in real[:100])
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"examples": [{"input": "hello", "target": "x"}]}))
    with pytest.raises(ConfigError, match=r"examples\[0\]: 'input' must be turns"):
        C.read_topical_chat(str(path))


def test_held_out_dialogues_are_whole_and_scored_once(shared_data):
    real = C.read_topical_chat(str(shared_data / "topical_chat" / "task.json.gz"))[:3000]
    ids = C.dialogue_ids(real)
    # a new dialogue starts exactly where the input holds one turn (BIG-bench lists every prefix)
    starts = [i for i, c in enumerate(real) if len(c) == 2]
    assert [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]] == starts
    n = ids[-1] + 1
    assert 100 < n < 3000 and ids == sorted(ids)
    train, held = C.held_out_dialogues(real, 0.1, seed=0)
    assert len(held) == round(0.1 * n) and len(train) + sum(ids.count(ids[real.index(h)])
                                                           for h in held) == len(real)  # fmt: skip
    texts = lambda c: "\n".join(m.content for m in c)  # noqa: E731
    train_texts = [texts(c) for c in train]
    for h in held:  # no training conversation continues a held-out dialogue's opening turns
        first = h[0].content + "\n" + h[1].content
        assert not any(t.startswith(first) for t in train_texts)
        i = real.index(h)  # the dialogue's longest conversation: the next one starts anew
        assert i + 1 == len(real) or ids[i + 1] != ids[i]
    assert C.held_out_dialogues(real, 0.1, seed=0) == (train, held)
    assert C.held_out_dialogues(real, 0.1, seed=1)[1] != held
    with pytest.raises(ConfigError, match="at least 2 dialogues"):
        C.held_out_dialogues(real[:1], 0.5)
    with pytest.raises(ConfigError, match="eval_data or eval_fraction, not both"):
        C.ChatConfig(data="a.jsonl", eval_data="b.jsonl", eval_fraction=0.1)


def test_template_choice_errors(small):
    ours, _ = small
    with pytest.raises(ConfigError, match=r"no chat template.*--chat\.template=chatml"):
        resolve_template("", ByteTokenizer())
    with pytest.raises(ConfigError, match=r"unknown chat template 'zephyr'"):
        resolve_template("zephyr", ours)
    smol = HFTokenizer(ours.tk)
    smol.token_to_id = lambda t: None if t == "<|eot_id|>" else 1
    with pytest.raises(ConfigError, match=r"'llama3' writes '<\|eot_id\|>', which is not a token"):
        resolve_template("llama3", smol)
    assert resolve_template("llama3", ByteTokenizer())  # no vocabulary: markers spelled out
    drops_old = (  # earlier assistant turns vanish once a later message follows
        "{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ConfigError, match=r"renders the conversation up to assistant turn 2"):
        C.ChatEncoder(ours, drops_old, 512).encode(CONV)
    with pytest.raises(ConfigError, match=r"drop --finetune\.add_eos"):
        C.check_chat(C.ChatConfig(data="x.jsonl"), F.FinetuneConfig(add_eos=True))


# ---------------------------------------------------------------- the one loop


def test_packed_chat_finetune_runs_on_the_one_loop(small, tmp_path):
    ours, _ = small
    ft = F.FinetuneConfig(seq_len=128, batch_size=8, eval_batch_size=8, pack=True, save=False)
    train = TrainConfig(steps=4, learning_rate=3e-3, warmup_steps=0, workdir=str(tmp_path),
                        log_every=1, mesh="", progress_bar=False)  # fmt: skip
    chat = C.ChatConfig(data="unused", template="chatml")
    out = F.finetune_chat(CFG, params(), ours, conversations(12), train, ft, chat,
                          eval_conversations=conversations(2), log=lambda s: None)  # fmt: skip
    assert len(out["history"]) == 4 and np.isfinite(out["history"]).all()
    assert np.isfinite(out["final"]["completion_loss"])


def test_eight_devices_give_the_same_chat_sft_steps_as_one(small, tmp_path):
    """Packed chat SFT (LoRA) on a 2x2x2 mesh of 8 CPU devices: the same losses and adapters as
    on one device."""
    from lm_jax import adapters as L
    from lm_jax.sharding import make_mesh

    ours, _ = small
    lora = L.LoraConfig(rank=4, alpha=8.0)
    ft = F.FinetuneConfig(seq_len=128, batch_size=8, eval_batch_size=8, pack=True, save=False,
                          lora=lora)  # fmt: skip
    chat = C.ChatConfig(data="unused", template="chatml")
    runs = []
    for name, mesh in (("one", ""), ("eight", "data:2,fsdp:2,tensor:2")):
        devices = jax.devices()[: 1 if not mesh else 8]
        train = TrainConfig(steps=3, learning_rate=1e-3, warmup_steps=0, log_every=1,
                            workdir=str(tmp_path / name), progress_bar=False)  # fmt: skip
        out = F.finetune_chat(CFG, params(), ours, conversations(12), train, ft, chat,
                              mesh=make_mesh(mesh, devices=devices),
                              log=lambda s: None)  # fmt: skip
        runs.append(out)
    np.testing.assert_allclose(runs[0]["history"], runs[1]["history"], rtol=1e-5, atol=1e-6)
    _, one = L.split_lora(jax.device_get(runs[0]["params"]))
    _, eight = L.split_lora(jax.device_get(runs[1]["params"]))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)
