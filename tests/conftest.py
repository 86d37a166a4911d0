"""Test set-up: 8 fake CPU devices (before jax is imported), shared data paths."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole suite, its worker processes, the binaries they
# start and the notebook kernels: the same tiny programs are compiled again and again (a resume test
# runs one binary three times, and the module fixture below clears the in-memory caches), and a
# cached tiny pretraining run takes half the time of a cold one. Executables are keyed by their HLO,
# flags and jax version, so a stale entry is never used. LM_JAX_TEST_XLA_CACHE=0 turns it off.
if os.environ.get("LM_JAX_TEST_XLA_CACHE", "1") != "0":
    import tempfile

    cache = os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "lm_jax_test_xla_cache")
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # No size limit inside a run (jax's LRU eviction takes a file lock on every read); the
    # controller empties the cache at start-up once it has grown past 4 GiB.
    if "PYTEST_XDIST_WORKER" not in os.environ and os.path.isdir(cache):
        if sum(e.stat().st_size for e in os.scandir(cache) if e.is_file()) > 4 << 30:
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data (test data beside the checkout; never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data folder {SHARED_DATA} is missing (expected ../shared/data)")
    return SHARED_DATA


def _memory_map_count() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Drop JAX's compiled executables after each test module.

    Every XLA:CPU executable keeps a few memory mappings alive; one pytest process compiles tens of
    thousands, and at Linux's default `vm.max_map_count` (65,530) the next compile segfaults (the
    suite died in an XLA compile at test ~430 of 490). Set LM_JAX_TEST_MAPS_LOG=path to record the
    mapping count per module.
    """
    yield
    import gc

    import jax

    before = _memory_map_count()
    jax.clear_caches()
    gc.collect()
    log = os.environ.get("LM_JAX_TEST_MAPS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{before} -> {_memory_map_count()}\n")


@pytest.fixture
def load_binary():
    """load_binary("experiments/x.py", argv) -> the binary's module, its absl flags parsed.

    Binaries define their flags on absl's global FLAGS at import, so two binaries (or a benchmark
    imported by another test in the same worker) that both define, say, --out collide. Flags that
    are not absl's own are set aside while the binary is imported and put back afterwards.
    """
    import importlib.util

    from absl import flags

    fv = flags.FLAGS

    def not_absl(name: str) -> bool:
        return fv.find_module_defining_flag(name, "").split(".")[0] != "absl"

    saved = {name: fv[name] for name in list(fv) if not_absl(name)}
    for name in saved:
        delattr(fv, name)

    def load(rel_path: str, argv: list[str]):
        path = REPO / rel_path
        spec = importlib.util.spec_from_file_location(f"binary_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fv([path.name, *argv])
        return module

    yield load
    for name in [n for n in list(fv) if not_absl(n)]:  # the binaries' flags
        delattr(fv, name)
    for name, flag in saved.items():
        fv[name] = flag
