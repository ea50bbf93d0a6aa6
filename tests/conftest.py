"""Test setup: 8 virtual CPU devices (for the sharding tests), a private data cache, small datasets."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same train step: let identical programs compile once per machine.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "sr_jax", "jax-tests")
)
# Every program, however quick to compile: the suite compiles thousands of small ones (eval steps, metrics,
# per-test shapes), and caching them all halves a warm run's time (a file measured 50 s at 0.5 s, 28 s at 0).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Synthetic datasets are generated into a per-session folder, never the user's cache."""
    os.environ["SR_JAX_DATA"] = str(tmp_path_factory.mktemp("sr_jax_data"))


# The suite's longest tests (pytest --durations): run first, so that with two workers stealing each other's
# queued tests (`make test`: --dist worksteal) none is left to run alone at the end.
LONGEST = (
    "test_cold_start.py::test_grid_runs",
    "test_multiprocess.py::test_two_processes",
    "test_experiment.py::test_grid_writes",
    "test_new_domain.py",
    "test_tuning.py::test_a_study_chooses",
    "test_export.py::test_embeddings_are",
    "test_finetune.py::test_strategy_auto",
)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not any(name in item.nodeid for name in LONGEST))
