"""Run experiments/ binaries as forked children of one warm interpreter.

A cold `python experiments/x.py --bad=flag` spends ~4-6 s importing jax, flax, orbax and lm_jax
before it reaches the line that rejects the flag; the bad-input matrix has ~100 such cases. The
server (`python warm_binaries.py`, started once per test process) imports every lm_jax module,
never touches a JAX backend, then forks one child per request. The child is what `python
experiments/x.py args` would be from there on: the script runs as `__main__` from its file with
its own argv, sys.path[0], working directory, a fresh flag registry (the parent never imports
a binary), stdin from /dev/null, stdout and stderr to files, and the exit code Python would
give (SystemExit's code; 1 and a traceback on an uncaught exception).

Protocol: one JSON request per line on the server's stdin ({argv, cwd, timeout}), one reply line
`@@warm {returncode, stdout, stderr}` on its stdout.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time

MARK = "@@warm "


class WarmBinaries:
    """Client: `run(argv, cwd, timeout)` -> subprocess.CompletedProcess. `env` is the server's
    (and so every child's) environment; it is fixed when the server starts."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.proc: subprocess.Popen | None = None
        atexit.register(self.close)

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=self.env,
            )
        return self.proc

    def run(self, argv: list[str], cwd: str, timeout: float) -> subprocess.CompletedProcess:
        proc = self._start()
        proc.stdin.write(json.dumps({"argv": argv, "cwd": cwd, "timeout": timeout}) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith(MARK):
                r = json.loads(line[len(MARK) :])
                return subprocess.CompletedProcess(
                    argv, r["returncode"], r["stdout"], r["stderr"]
                )
        raise RuntimeError(f"the warm binary server died (exit {proc.wait()}) on {argv}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --------------------------------------------------------------------------- server side


def _import_everything() -> None:
    import importlib
    import pkgutil

    import absl.app  # noqa: F401  (the binaries' own imports)
    import absl.flags  # noqa: F401

    import lm_jax

    for m in pkgutil.walk_packages(lm_jax.__path__, "lm_jax."):
        importlib.import_module(m.name)
    from jax._src import xla_bridge

    # a backend created here would be shared with children whose XLA threads do not exist
    assert not xla_bridge._backends, "importing lm_jax initialized a JAX backend"


def _child(req: dict, out_path: str, err_path: str) -> None:
    import runpy
    import traceback

    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(out_path, os.O_WRONLY | os.O_TRUNC), 1)
        os.dup2(os.open(err_path, os.O_WRONLY | os.O_TRUNC), 2)
        os.chdir(req["cwd"])
        script = req["argv"][0]
        sys.argv = list(req["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, timeout: float) -> int:
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.01)


def serve() -> None:
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the imports print goes to stderr, not into the replies
    _import_everything()
    for line in sys.stdin:
        req = json.loads(line)
        with tempfile.TemporaryDirectory() as tmp:
            out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            for p in (out_path, err_path):
                open(p, "w").close()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(req, out_path, err_path)
            rc = _wait(pid, float(req["timeout"]))
            with open(out_path) as f:
                out = f.read()
            with open(err_path) as f:
                err = f.read()
        if rc == -9:
            err += f"\n[warm_binaries] killed after {req['timeout']} s"
        reply.write(MARK + json.dumps({"returncode": rc, "stdout": out, "stderr": err}) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve()
