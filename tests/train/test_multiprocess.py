"""Two processes x 4 CPU devices (jax.distributed, gloo collectives) equal one 8-device process."""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    ref = tmp_path / "ref.json"
    subprocess.run([sys.executable, WORKER, "0", "0", "0", ref], check=True, timeout=300)
    port = _free_port()
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(port), "2", str(i), outs[i]])
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0
    want = json.loads(ref.read_text())["losses"]
    for o in outs:
        got = json.loads(o.read_text())
        assert got["process_count"] == 2 and got["devices"] == 8
        np.testing.assert_allclose(got["losses"], want, rtol=1e-5)
