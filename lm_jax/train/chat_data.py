"""Multi-turn chat data for supervised fine-tuning: conversations, their readers, and rows with
loss on the assistant's tokens only.

Conversations follow the `messages` convention: `{"messages": [{"role": "system" | "user" |
"assistant", "content": "..."}, ...]}`, one JSON object per line (`read_messages`); a system
message may only come first, and every conversation needs an assistant turn. BIG-bench's
topical_chat (`read_topical_chat`) becomes the same: each example's `input` (`agent_A: "..."
agent_B: "..."`) is the conversation so far and its `target` the next turn; the target's speaker
(agent_B) is the assistant, the other one the user. `load_conversations(spec)` reads a spec:
`<path>.jsonl`, `jsonl:<path>` or `topical_chat:<path>` (the task.json, gzipped or not).

Rendering: the conversation is rendered by a chat template (`lm_jax.data.chat_template`: the
tokenizer's own or a built-in one) and the text tokenized without the tokenizer's special tokens,
exactly as transformers' `apply_chat_template(messages, tokenize=True)` does.

Loss mask (`ChatEncoder`; HF's `{% generation %}` convention): the tokens of each assistant
turn's content and of its end-of-turn marker get 1 (e.g. ChatML `Hi!<|im_end|>`, not the
newline after it), everything else 0: system and user turns, role headers, the template's
default system prompt, separators. Found by rendering, not by knowing the template:
  start  where the text stops agreeing with the same conversation rendered with this turn's
         content replaced by a sentinel (so a turn that opens the conversation works too);
  end    the end of the conversation rendered up to this turn (it must be a prefix of the
         whole: a template that renders earlier turns differently once later ones follow is
         refused), trailing whitespace excluded.
Characters become tokens by tokenizing the text up to each boundary: a token straddling a start
counts as the assistant's, one straddling an end as context. `loss_turns="last"` keeps loss on
the last assistant turn only. Rows are (ids [n] int32, target mask [n - 1] float32) with
target t = ids[t + 1], the form `sft_data.make_batch` / `PackedSFTBatches` pack.

Too long for `seq_len + 1` tokens: the oldest exchanges (after a leading system message: the
messages up to and including the first assistant turn) go first while another assistant turn
with loss remains, then the row's end is cut; a conversation left with no loss token is skipped
(`encode` returns None).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from lm_jax.configs.base import ConfigError
from lm_jax.data.chat_template import BUILTIN_TEMPLATES, render_chat
from lm_jax.train.jsonl import jsonl_objects
from lm_jax.train.sft_data import _encode

ROLES = ("system", "user", "assistant")
SENTINEL = "\ue000lm_jax\ue001"  # private-use characters: no template or text writes them


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


Conversation = tuple[Message, ...]


@dataclasses.dataclass(frozen=True)
class ChatConfig:
    """Chat fine-tuning data (`--chat.<field>`); rows, batches and packing: FinetuneConfig."""

    data: str = ""  # conversations: <path>.jsonl | jsonl:<path> | topical_chat:<path>; '' = none
    eval_data: str = ""  # held-out conversations (same forms) for eval/completion_loss
    # share of data's dialogues held out for eval/completion_loss when eval_data is '' (whole
    # dialogues, seeded; `held_out_dialogues`); 0 = none
    eval_fraction: float = 0.0
    template: str = ""  # '' = the tokenizer's own chat template; or chatml | llama3 | gemma
    loss_turns: Literal["all", "last"] = "all"  # assistant turns with loss

    def __post_init__(self):
        if self.loss_turns not in ("all", "last"):
            raise ConfigError(f"loss_turns must be 'all' or 'last', got {self.loss_turns!r}.")
        if self.template and self.template not in BUILTIN_TEMPLATES:
            raise ConfigError(
                f"unknown chat template {self.template!r}: choose one of "
                f"{sorted(BUILTIN_TEMPLATES)}, or '' for the tokenizer's own."
            )
        if self.eval_data and not self.data:
            raise ConfigError("eval_data needs data: give the training conversations too.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.eval_fraction and self.eval_data:
            raise ConfigError(
                "give eval_data or eval_fraction, not both: eval_fraction holds dialogues of "
                "data out instead of reading eval_data."
            )


def check_chat(chat: ChatConfig, ft) -> None:
    """ConfigError for FinetuneConfig options that have no meaning on conversations."""
    if ft.add_eos:
        raise ConfigError(
            "add_eos appends EOS to completions; chat turns end with the template's end-of-turn "
            "marker: drop --finetune.add_eos."
        )


# --------------------------------------------------------------------------- reading


def conversation(messages, where: str) -> Conversation:
    """`messages` ([{role, content}]) checked: ConfigError naming `where` and the fix."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}}.")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"{at} must be an object with 'role' and 'content'.")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ConfigError(f"{at} has role {role!r}; roles are {list(ROLES)}.")
        if not isinstance(content, str):
            raise ConfigError(f"{at}: 'content' must be a string, got {type(content).__name__}.")
        if role == "system" and i:
            raise ConfigError(f"{at} is a system message; only the first message may be one.")
        if role == "assistant" and not content.strip():
            raise ConfigError(f"{at}: an assistant turn is empty; give it content or drop it.")
        out.append(Message(role, content))
    if not any(m.role == "assistant" for m in out):
        raise ConfigError(f"{where}: no assistant turn, so nothing to learn; give it one.")
    return tuple(out)


def read_messages(path: str) -> list[Conversation]:
    """{"messages": [{role, content}, ...]} per line (`lm_jax.train.jsonl`)."""
    rows = jsonl_objects(path, ("messages",), "chat")
    out = [conversation(d["messages"], where) for where, d in rows]
    if not out:
        raise ConfigError(f"{path} holds no conversations.")
    return out


_AGENT = re.compile(r"(?:^|\s)agent_([AB]):\s")


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return text.strip()


def topical_chat_messages(input_text: str, target: str, where: str) -> Conversation:
    """One BIG-bench topical_chat example as a conversation: agent_A = user, agent_B (the
    target's speaker) = assistant; consecutive turns of one speaker are joined by a newline."""
    parts = _AGENT.split(input_text)
    if parts[0].strip() or len(parts) < 3:
        raise ConfigError(f"{where}: 'input' must be turns 'agent_A: \"...\" agent_B: \"...\"'.")
    speakers, texts = parts[1::2], parts[2::2]
    turns = [("user" if s == "A" else "assistant", _unquote(t)) for s, t in zip(speakers, texts)]
    turns.append(("assistant", _unquote(target)))
    merged: list[list[str]] = []
    for role, text in turns:
        if merged and merged[-1][0] == role:
            merged[-1][1] += "\n" + text
        else:
            merged.append([role, text])
    return conversation([{"role": r, "content": c} for r, c in merged], where)


def read_topical_chat(path: str) -> list[Conversation]:
    """Every example of BIG-bench's topical_chat task.json (or .json.gz) as a conversation."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"topical_chat file {path!r} not found.")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            task = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not a BIG-bench task JSON ({e}).") from None
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list) or not examples:
        raise ConfigError(f"{path} holds no 'examples': expected BIG-bench's topical_chat task.")
    out = []
    for i, ex in enumerate(examples):
        where = f"{path}: examples[{i}]"
        target = ex.get("target") if isinstance(ex, dict) else None
        if isinstance(target, list):
            target = target[0] if target else None
        if not isinstance(target, str) or not isinstance(ex.get("input"), str):
            raise ConfigError(f"{where} needs a string 'input' and 'target'.")
        out.append(topical_chat_messages(ex["input"], target, where))
    return out


READERS = {"jsonl": read_messages, "topical_chat": read_topical_chat}


def dialogue_ids(convs: Sequence[Conversation]) -> list[int]:
    """The dialogue of each conversation: a conversation whose turns' text extends the previous
    one's continues its dialogue (topical_chat lists every prefix of a dialogue in order: the
    conversation so far, then with the next turn), otherwise it starts a new one."""
    ids, prev = [], None
    for conv in convs:
        text = "\n".join(m.content for m in conv)
        new = prev is None or not text.startswith(prev)
        ids.append(ids[-1] + new if ids else 0)
        prev = text
    return ids


def held_out_dialogues(convs: Sequence[Conversation], fraction: float, seed: int = 0):
    """(train conversations, held-out conversations): `fraction` of the dialogues
    (`dialogue_ids`, at least one), drawn with `seed`, are held out whole, none of their
    turns trained on; each is scored once, as its longest conversation (every assistant turn
    given the turns before it)."""
    ids = dialogue_ids(convs)
    n = ids[-1] + 1 if ids else 0
    if n < 2:
        raise ConfigError(f"eval_fraction needs at least 2 dialogues in the data, got {n}.")
    k = min(max(1, round(fraction * n)), n - 1)
    held = set(np.random.default_rng([seed, 2718]).permutation(n)[:k].tolist())
    train = [c for c, d in zip(convs, ids) if d not in held]
    last = {d: c for c, d in zip(convs, ids) if d in held}  # the longest: listed last
    return train, [last[d] for d in sorted(last)]


def load_conversations(spec: str, limit: int | None = None) -> list[Conversation]:
    """The conversations of `spec`: `<path>.jsonl`, `jsonl:<path>` or `topical_chat:<path>`
    (the first `limit` of them)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in READERS:
        if spec.endswith(".jsonl") or os.path.isfile(spec):
            kind, path = "jsonl", spec
        else:
            raise ConfigError(
                f"chat data {spec!r}: give <path>.jsonl, jsonl:<path> or topical_chat:<path>."
            )
    return READERS[kind](path)[:limit]


# --------------------------------------------------------------------------- rows


def special_tokens(tokenizer) -> dict[str, str]:
    """bos_token / eos_token / pad_token strings for templates ('' where there is none)."""
    name = getattr(tokenizer, "id_to_token", None)

    def get(attr):
        i = getattr(tokenizer, attr, None)
        return (name(i) or "") if name is not None and i is not None else ""

    return {f"{k}_token": get(f"{k}_id") for k in ("bos", "eos", "pad")}


def _agreeing(a: Sequence, b: Sequence) -> int:
    """Length of the common prefix of two sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _shorter(conv: Conversation) -> list[Conversation]:
    """`conv` and the conversations left after dropping its 1, 2, .. oldest exchanges (after a
    leading system message: the messages through the first assistant turn), while an assistant
    turn remains."""
    head = conv[:1] if conv[0].role == "system" else ()
    out, body = [conv], conv[len(head) :]
    while True:
        first = next(k for k, m in enumerate(body) if m.role == "assistant")
        body = body[first + 1 :]
        if not any(m.role == "assistant" for m in body):
            return out
        out.append(head + body)


@dataclasses.dataclass(frozen=True)
class ChatEncoder:
    """Conversations -> rows (module docstring): `encode(conv)` -> (ids [n] int32, target
    mask [n - 1] float32) with n <= seq_len + 1, or None when nothing is left to learn."""

    tokenizer: object
    template: str  # jinja2 source (`chat_template.resolve_template`)
    seq_len: int
    loss_turns: Literal["all", "last"] = "all"

    def render(self, messages: Sequence[Message], **kw) -> str:
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        return render_chat(self.template, msgs, **special_tokens(self.tokenizer), **kw)

    def tokens(self, text: str) -> list[int]:
        return _encode(self.tokenizer, text, False)

    def spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered text, [(start, end) character span of each assistant turn with loss])."""
        full = self.render(conv)
        turns = [i for i, m in enumerate(conv) if m.role == "assistant"]
        if self.loss_turns == "last":
            turns = turns[-1:]
        out = []
        for i in turns:
            marked = self.render(conv[:i] + (Message("assistant", SENTINEL),))
            start = marked.find(SENTINEL)
            through = self.render(conv[: i + 1]).rstrip()
            if start < 0 or not (full.startswith(marked[:start]) and full.startswith(through)):
                raise ConfigError(
                    f"the chat template renders the conversation up to assistant turn {i} "
                    "differently from the start of the whole conversation (or rewrites the "
                    "turn's content), so its tokens cannot be masked: choose a built-in template "
                    "(--chat.template=chatml|llama3|gemma)."
                )
            out.append((start, max(start, len(through))))
        return full, out

    def token_mask(self, text: str, spans: Sequence[tuple[int, int]]):
        """(ids [n] int32 of `text`, mask [n] float32: 1 on the tokens of `spans`). Tokenized
        piece by piece between the span boundaries when that gives the whole text's tokens;
        else each boundary is found by tokenizing the text up to it."""
        cuts = [0, *(c for span in spans for c in span), len(text)]
        pieces = [self.tokens(text[a:b]) for a, b in zip(cuts, cuts[1:])]
        ids = self.tokens(text)
        if sum(pieces, []) == ids:
            bounds = np.cumsum([0] + [len(p) for p in pieces])
            starts, ends = bounds[1:-1:2], bounds[2:-1:2]
        else:  # a token straddles a boundary: at a start it is the assistant's, at an end not
            starts = [_agreeing(self.tokens(text[:s]), ids) for s, _ in spans]
            ends = [_agreeing(self.tokens(text[:e]), ids) for _, e in spans]
        mask = np.zeros(len(ids), np.float32)
        for a, b in zip(starts, ends):
            mask[a:b] = 1.0
        return np.asarray(ids, np.int32), mask

    def encode_full(self, conv: Conversation) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n] int32, token mask [n] float32: 1 on assistant tokens), untruncated."""
        return self.token_mask(*self.spans(conv))

    def encode(self, conv: Conversation):
        """(ids [n] int32, target mask [n - 1] float32), truncated to fit; None: nothing left."""
        room = self.seq_len + 1
        cands = _shorter(conv)
        if len(cands) > 1 and len(self.tokens(self.render(conv))) > room:
            lo, hi = 1, len(cands) - 1  # the fewest exchanges dropped that fit (else the most)
            while lo < hi:
                mid = (lo + hi) // 2
                if len(self.tokens(self.render(cands[mid]))) <= room:
                    hi = mid
                else:
                    lo = mid + 1
            conv = cands[lo]
        ids, mask = self.encode_full(conv)
        ids, mask = ids[:room], mask[:room]
        if len(ids) < 2 or not mask[1:].any():
            return None
        return ids, mask[1:]
