"""The Colab notebooks (colab/*.ipynb): stored clean, and each runs top to bottom with TINY = True.

Execution uses nbclient with a kernel spec written here that runs this interpreter
(`sys.executable -m ipykernel_launcher`), so the notebooks see this venv's lm_jax. `TINY = True`
is injected after the cell tagged `parameters` (papermill style). Kernels get one CPU device (the
fake 8 of conftest are removed from XLA_FLAGS: notebooks run as a user's would; 07_sharding
asks for 8 itself) and work in a temporary folder. Each notebook has a hard limit of
NOTEBOOK_LIMIT_S seconds in all.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import pathlib
import re
import sys
import time

import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]
EXPECTED = [
    "01_quickstart",
    "02_pretrained",
    "03_lora",
    "04_moe",
    "05_alignment",
    "06_image_text",
    "07_sharding",
    "08_post_training",
    "09_encoders_translation",
    "10_eval_harness",
]
NOTEBOOK_LIMIT_S = 180  # per notebook, all cells together (target: ~90 s on 2 CPU cores)


def _read(name: str):
    return nbformat.read(REPO / "colab" / f"{name}.ipynb", as_version=4)


def _code(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_all_notebooks_present():
    assert NAMES == EXPECTED, f"colab/ holds {NAMES}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_stored_clean_and_well_formed(name):
    nb = _read(name)
    nbformat.validate(nb)
    for i, c in enumerate(_code(nb)):
        assert c.outputs == [], f"{name}: code cell {i} has stored outputs: strip them"
        assert c.execution_count is None, f"{name}: code cell {i} has an execution count"
    assert "widgets" not in nb.metadata, f"{name}: widget state stored in the metadata"
    first = nb.cells[0]
    assert first.cell_type == "code", f"{name}: the first cell must be the set-up code cell"
    assert '"google.colab" in sys.modules' in first.source, f"{name}: Colab install guard"
    assert "jax.default_backend()" in first.source, f"{name}: backend detection"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{name}: exactly one cell tagged 'parameters'"
    assert re.search(r"^TINY = False\b", params[0].source, re.M), params[0].source
    src = "\n".join(c.source for c in _code(nb))
    assert re.search(r"^\s*(from|import) lm_jax", src, re.M), f"{name} does not use lm_jax"
    for node in ast.walk(ast.parse(src)):
        assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)), (
            f"{name} defines {node.name!r} (line {node.lineno}): reusable logic belongs in lm_jax"
        )


def _with_tiny(nb):
    """A copy with `TINY = True` injected after the parameters cell and an interpreter check."""
    nb = copy.deepcopy(nb)
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    inject = nbformat.v4.new_code_cell("TINY = True")
    inject.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, inject)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint('KERNEL', sys.executable)"))
    return nb


def _kernel_env() -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory) -> str:
    """A kernel spec that runs this interpreter, found first through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "lm_jax_venv"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "lm_jax (.venv)", "language": "python"})
    )
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root) + (os.pathsep + old if old else "")
    yield "lm_jax_venv"
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_tiny(name, kernel_name, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = _with_tiny(_read(name))
    deadline = time.monotonic() + NOTEBOOK_LIMIT_S
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=NOTEBOOK_LIMIT_S,
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(tmp_path)}},
        allow_errors=False,
    )
    t0 = time.monotonic()
    try:
        client.execute(env=_kernel_env())
    except CellTimeoutError:
        pytest.fail(f"{name} ran past {NOTEBOOK_LIMIT_S} s with TINY = True")
    except CellExecutionError as e:
        pytest.fail(f"{name} failed:\n{e}")
    took = time.monotonic() - t0
    print(f"{name}: {took:.1f} s")
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert f"KERNEL {sys.executable}" in last, f"kernel ran another interpreter: {last!r}"
    assert took < NOTEBOOK_LIMIT_S
