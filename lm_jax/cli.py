"""One command-line convention for every binary in experiments/.

Config dataclasses become flags `--<prefix>.<field>` (lm_jax/configs/flags.py): TrainConfig is
`--train.x`, ModelConfig `--model.x`, DataConfig `--data.x`, a binary's own config
`--finetune.x`, `--align.x`, `--image_text.x`. Flags that are no config field (`--checkpoint`,
`--prompt`, ...) are plain absl flags. A binary:

    cli.define_config("train", TrainConfig, fields=("steps", "mesh"))  # at import
    cli.deprecate("steps", "train.steps")                               # an old spelling
    def main(argv):
        train_cfg = cli.config("train", TrainConfig(steps=200))        # preset + set flags
    if __name__ == "__main__":
        cli.run(main)

Exit policy of `run`: 0 done; 2 bad input, printed as exactly one line `error: <problem and
fix>` (unknown or malformed flags, positional arguments, lm_jax.errors.USER_ERRORS: configs,
files, checkpoints, meshes, tokenizers); 3 a training halt (non-finite loss,
lm_jax.train.loop.TrainingHalted), one line `halted: ...`. Anything else is a bug: traceback.
An old flag spelling is rewritten to the new one with one `warning:` line on stderr.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging

from lm_jax.configs.flags import apply_config_flags, define_config_flags
from lm_jax.errors import USER_ERRORS, ConfigError

FLAGS = flags.FLAGS
EXIT_USER_ERROR = 2
EXIT_HALTED = 3


@dataclasses.dataclass(frozen=True)
class _Deprecated:
    old: str
    new: str
    convert: Callable[[str], list[str]] | None  # value -> new argv tokens (None: rename)


_DEPRECATED: dict[str, _Deprecated] = {}
_PREFIXES: dict[str, type] = {}


def define_config(prefix: str, cls: type, fields: Sequence[str] | None = None) -> None:
    """`--prefix.field` flags for the fields of dataclass `cls` (`fields`: only these)."""
    define_config_flags(prefix, cls, FLAGS, fields=None if fields is None else set(fields))
    _PREFIXES[prefix] = cls


def deprecate(old: str, new: str, convert: Callable[[str], list[str]] | None = None) -> None:
    """Keep `--old` working for one release: it becomes `--new` (or `convert(value)`, a list
    of argv tokens) with a one-line warning naming the new flag."""
    _DEPRECATED[old] = _Deprecated(old, new, convert)


def is_set(name: str) -> bool:
    """Whether flag `name` was given on the command line."""
    return name in FLAGS and bool(FLAGS[name].present)


def _set_flags(prefix: str) -> list[str]:
    return [n for n in FLAGS if n.startswith(prefix + ".") and FLAGS[n].present]


def config(prefix: str, default: Any) -> Any:
    """`default` with every given `--prefix.x` flag applied. An invalid result is a
    ConfigError that names the flag to change."""
    try:
        return apply_config_flags(prefix, default, FLAGS)
    except (ConfigError, TypeError, ValueError) as e:
        msg = str(e)
        given = _set_flags(prefix)
        named = [n for n in given if re.search(rf"\b{re.escape(n.split('.')[-1])}\b", msg)]
        hint = named or given
        if hint and f"--{hint[0]}" not in msg:
            msg = f"{msg} (set by --{', --'.join(hint)})"
        elif not hint:
            msg = f"{msg} (a --{prefix}.* flag may fix it)"
        raise ConfigError(msg) from None


def make(prefix: str, build: Callable[..., Any], /, **kw) -> Any:
    """`build(**kw)` (a config built from plain flags), its ConfigError naming `--prefix.*`."""
    try:
        return build(**kw)
    except ConfigError as e:
        raise ConfigError(f"{e} (see the --{prefix}.* flags)") from None


def _rewrite_deprecated(argv: list[str]) -> list[str]:
    out, i = [argv[0]], 1
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok == "--":
            out += argv[i - 1 :]
            break
        m = re.fullmatch(r"--?(no)?([\w.]+)(=.*)?", tok)
        dep = None
        if m:
            name = m.group(2)
            neg = m.group(1) or ""
            if neg and name not in _DEPRECATED and ("no" + name) in _DEPRECATED:
                neg, name = "", "no" + name
            dep = _DEPRECATED.get(name)
        if dep is None:
            out.append(tok)
            continue
        print(
            f"warning: --{dep.old} is deprecated (removed in the next release); use --{dep.new}",
            file=sys.stderr,
        )
        value = m.group(3)
        if dep.convert is None:
            out.append(f"--{neg}{dep.new}{value or ''}")
            continue
        if value is None and not neg:
            if i >= len(argv):
                fail(f"--{dep.old} needs a value; use --{dep.new}=...")
            value, i = "=" + argv[i], i + 1
        out += dep.convert("false" if neg else (value or "=true")[1:])
    return out


def fail(msg: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print `error: msg` as one line and exit `code`."""
    line = " ".join(str(msg).split())
    print(f"error: {line}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(code)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        what = {FileNotFoundError: "no such file or directory"}.get(type(e), e.strerror or str(e))
        return f"{what}: {e.filename!r}; check the path"
    return str(e) or type(e).__name__


def _parse(argv: list[str]) -> list[str]:
    try:
        return FLAGS(_rewrite_deprecated(list(argv)))
    except flags.Error as e:
        fail(f"{e} (see --helpfull for the flags)")


def _halted(e: BaseException) -> bool:
    loop = sys.modules.get("lm_jax.train.loop")
    halted = getattr(loop, "TrainingHalted", None)
    return (halted is not None and isinstance(e, halted)) or isinstance(e, FloatingPointError)


def run(main: Callable[[list[str]], Any], positional: bool = False) -> NoReturn:
    """absl's app.run with the exit policy above; `positional`: allow positional arguments."""

    def wrapped(argv):
        if not FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
        try:
            if not positional and len(argv) > 1:
                fail(f"unexpected positional arguments {argv[1:]}; flags look like --x=y")
            return main(argv)
        except app.UsageError as e:
            fail(str(e))
        except USER_ERRORS as e:
            fail(_describe(e))
        except Exception as e:
            if _halted(e):
                print(f"halted: {' '.join(str(e).split())}", file=sys.stderr)
                sys.exit(EXIT_HALTED)
            raise

    app.run(wrapped, flags_parser=_parse)


def print_report(report: dict, out: str | None = None) -> None:
    """Print a binary's JSON report and, with `out`, write it there too."""
    import json

    print(json.dumps(report, indent=1, default=str))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1, default=str)
