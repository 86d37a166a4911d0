"""Chat templates: jinja2 rendering with transformers' rules, and a small registry of built-ins.

`render_chat(source, messages, ...)` renders a chat template exactly as transformers'
`apply_chat_template` does (sandboxed environment, `trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension, a `tojson` filter that keeps non-ASCII, `raise_exception` and
`strftime_now` globals, and `{% generation %}` blocks rendered as their body); compiled
templates are cached by source. `lm_jax.data.hf_tokenizer.HFTokenizer.apply_chat_template`
renders through it.

Built-in templates (`BUILTIN_TEMPLATES`, chosen by name with `resolve_template`), for models
whose tokenizer carries no template or to train a new chat format:
  chatml   `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message (Qwen / SmolLM2 style,
           no default system prompt);
  llama3   Meta Llama 3 Instruct's: `bos_token`, then
           `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>`;
  gemma    Gemma 2/3 style: `bos_token`, `<start_of_turn>{user|model}\\n{content|trim}
           <end_of_turn>\\n`, a system message folded into the first turn (followed by a blank
           line); unlike Gemma's own, it does not insist on strictly alternating roles.
Each names its marker tokens: with a tokenizer that has a vocabulary (`token_to_id`), every
marker must be one token of it, else the template is refused (the markers would be spelled out
in pieces and generation would never stop at them); byte and character tokenizers spell them.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json

from lm_jax.configs.base import ConfigError
from lm_jax.errors import TokenizerError


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str  # the jinja2 template
    markers: tuple[str, ...]  # special tokens the template writes (one token each)


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_prefix = messages[0]['content'] | trim + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set first_prefix = '' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {
    t.name: t
    for t in (
        ChatTemplate("chatml", CHATML, ("<|im_start|>", "<|im_end|>")),
        ChatTemplate("llama3", LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
        ChatTemplate("gemma", GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    )
}


# --------------------------------------------------------------------------- rendering


def _raise_exception(message):
    raise TokenizerError(f"chat template error: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _generation_extension():
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers): the
    body, rendered as is."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return Generation


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled jinja2 template of `source` (cached); TokenizerError if it does not parse."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _generation_extension()],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not parse: {e} (line {e.lineno}).") from None


def render_chat(
    source: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    bos_token: str = "",
    eos_token: str = "",
    pad_token: str = "",
    **kwargs,
) -> str:
    """`messages` ([{role, content}]) rendered by the template `source` (transformers' rules).

    Encode the text without the tokenizer's special tokens: templates write their own BOS.
    """
    return compile_template(source).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        **kwargs,
    )


# --------------------------------------------------------------------------- choosing one


def resolve_template(name: str, tokenizer) -> str:
    """The template source to render with: `name` '' = the tokenizer's own chat template, else
    a built-in one (its markers checked against the tokenizer's vocabulary). ConfigError naming
    the fix otherwise."""
    names = sorted(BUILTIN_TEMPLATES)
    if not name:
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise ConfigError(
                f"the tokenizer ({type(tokenizer).__name__}) has no chat template: choose a "
                f"built-in one with --chat.template={'|'.join(names)}."
            )
        return own
    if name not in BUILTIN_TEMPLATES:
        raise ConfigError(
            f"unknown chat template {name!r}: choose one of {names}, or '' for the tokenizer's "
            "own (--chat.template)."
        )
    template = BUILTIN_TEMPLATES[name]
    lookup = getattr(tokenizer, "token_to_id", None)
    if lookup is not None:
        missing = [m for m in template.markers if lookup(m) is None]
        if missing:
            raise ConfigError(
                f"chat template {name!r} writes {missing[0]!r}, which is not a token of this "
                f"tokenizer: choose a template whose markers it has (--chat.template=''"
                " for its own, if it carries one)."
            )
    return template.source
