"""Run experiments/ binaries as forked children of one warm interpreter.

A cold `python experiments/x.py --bad=flag` spends ~4-6 s importing jax, flax, orbax and lm_jax
before it reaches the line that rejects the flag; the bad-input matrix has ~100 such cases. The
server (`python warm_binaries.py`, started once per test process) imports every lm_jax module,
never touches a JAX backend, then forks one child per request. The child is what `python
experiments/x.py args` would be from there on: the script runs as `__main__` from its file with
its own argv, sys.path[0], working directory, a fresh flag registry (the parent never imports
a binary), stdin from /dev/null, stdout and stderr to files, and the exit code Python would
give (SystemExit's code; 1 and a traceback on an uncaught exception).

Protocol: one JSON request per line on the server's stdin, one reply line `@@warm {...}` on its
stdout: `{op: spawn, argv, cwd, stdout, stderr, env}` -> `{pid}`; `{op: wait, pid, timeout}` ->
`{returncode}` (null while it runs). A child killed with `kill -9` dies as a cold process would:
no atexit handlers, no flush, async checkpoint threads cut wherever they are.
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
# read by lm_jax at call time, not at import, so one server can serve every value
RUNTIME_ENV = ("LM_JAX_FAULTS",)


class WarmProcess:
    """A running child, the subset of `subprocess.Popen` the tests use (pid, poll, wait, signals).
    It is the server's child, so its exit status comes back through the server."""

    def __init__(self, server: WarmBinaries, pid: int, args: list[str]):
        self._server, self.pid, self.args = server, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(timeout=0, _raise=False)

    def wait(self, timeout: float | None = None, _raise: bool = True) -> int | None:
        if self.returncode is None:
            rc = self._server._request(
                {"op": "wait", "pid": self.pid, "timeout": 1e9 if timeout is None else timeout}
            )["returncode"]
            if rc is None and _raise:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = rc
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(9)


class WarmBinaries:
    """Client. `run(argv, cwd, timeout)` -> subprocess.CompletedProcess; `popen(argv, stdout,
    stderr, cwd)` -> WarmProcess. `env` is the server's (and so every child's) environment,
    fixed when the server starts, except `RUNTIME_ENV`, set per child. `argv` is the script and
    its arguments, optionally preceded by sys.executable."""

    _pool: dict[tuple, WarmBinaries] = {}

    def __init__(self, env: dict[str, str]):
        self.env = {k: v for k, v in env.items() if k not in RUNTIME_ENV}
        self.proc: subprocess.Popen | None = None
        atexit.register(self.close)

    @classmethod
    def for_env(cls, env: dict[str, str]) -> WarmBinaries:
        """One shared server per environment (ignoring RUNTIME_ENV)."""
        key = tuple(sorted((k, v) for k, v in env.items() if k not in RUNTIME_ENV))
        if key not in cls._pool:
            cls._pool[key] = cls(env)
        return cls._pool[key]

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

    def _request(self, req: dict) -> dict:
        proc = self._start()
        proc.stdin.write(json.dumps(req) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        raise RuntimeError(f"the warm binary server died (exit {proc.wait()}) on {req}")

    @staticmethod
    def _args(argv, env) -> dict:
        argv = [str(a) for a in argv]
        if argv[0] == sys.executable:
            argv = argv[1:]
        env = env or {}
        return {"argv": argv, "env": {k: env.get(k) for k in RUNTIME_ENV}}

    def run(
        self, argv: list, cwd: str | None = None, timeout: float = 600, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """Run to the end (killed after `timeout` s: returncode -9), capturing stdout/stderr."""
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            p = self.popen(argv, out, err, cwd, env)
            rc = p.wait(timeout=timeout, _raise=False)
            if rc is None:
                p.kill()
                rc = p.wait()
            with open(out) as f_out, open(err) as f_err:
                stdout, stderr = f_out.read(), f_err.read()
        if rc == -9:
            stderr += f"\n[warm_binaries] killed (timeout {timeout} s)"
        return subprocess.CompletedProcess(argv, rc, stdout, stderr)

    def popen(
        self, argv: list, stdout: str, stderr: str, cwd: str | None = None, env: dict | None = None
    ) -> WarmProcess:
        """Start the binary with stdout and stderr going to those files (the same path: both
        into one file, as `stderr=subprocess.STDOUT`)."""
        for path in {str(stdout), str(stderr)}:
            open(path, "w").close()  # readable as soon as this returns, as with Popen
        req = self._args(argv, env)
        req.update(op="spawn", cwd=cwd or os.getcwd(), stdout=str(stdout), stderr=str(stderr))
        return WarmProcess(self, self._request(req)["pid"], req["argv"])

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


def _child(req: dict) -> None:
    import runpy
    import traceback

    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        out = os.open(req["stdout"], flags)
        os.dup2(out, 1)
        os.dup2(out if req["stderr"] == req["stdout"] else os.open(req["stderr"], flags), 2)
        for k, v in req["env"].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
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


def _wait(pid: int, timeout: float) -> int | None:
    """The child's exit code (negative: killed by that signal), or None if still running."""
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= end:
            return None
        time.sleep(0.01)


def serve() -> None:
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the imports print goes to stderr, not into the replies
    _import_everything()
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "spawn":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(req)
            out = {"pid": pid}
        else:
            out = {"returncode": _wait(req["pid"], float(req["timeout"]))}
        reply.write(MARK + json.dumps(out) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve()
