"""Test-wide settings: the backend tier, strict rank promotion, no cloud probing.

JAXPOST_TEST_BACKEND picks the tier:
  cpu (default)  JAX_PLATFORMS=cpu and 8 simulated host devices: the suite CI runs.
  accelerator    JAX_PLATFORMS and XLA_FLAGS are left as they are, so JAX finds the GPU or TPU;
                 run it as `JAXPOST_TEST_BACKEND=accelerator pytest -m accelerator` for the
                 compiled kernel tests (the rest of the suite assumes 8 devices).
Tests marked `accelerator` are skipped, with the reason, wherever JAX's backend is the CPU.

The environment variables must be set before jax (or TensorFlow) is first imported, which is why
they live at the top of the root conftest.
"""

import os

TIERS = ("cpu", "accelerator")
TIER = os.environ.get("JAXPOST_TEST_BACKEND", "cpu")
if TIER not in TIERS:
    raise RuntimeError(f"JAXPOST_TEST_BACKEND must be one of {TIERS}, got {TIER!r}")

os.environ.setdefault("NO_GCE_CHECK", "true")
# glibc's default malloc, not the huge pages the experiment mains give themselves
# (jaxpost.hostmem), for the workers and every program a test starts: the suite compiles far
# more than it runs, and a compile-bound run is slower on them (2026-12-05, the 2-core CPU: the
# README's six-arm --mini command 100 s with them, 86 s without)
os.environ.setdefault("JAXPOST_HUGE_PAGES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if TIER == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in _flags:
        _flags += " --xla_force_host_platform_device_count=8"
    # LLVM at -O0 compiles a program in about half the time; the suite's programs are tiny, so
    # compiling dominates (measured 2026-12-02 on the 2-core CPU: test_train_mesh + test_loops
    # 154 s -> 107 s). XLA's own passes, and so the arithmetic they schedule, are unchanged; the
    # tests' programs inherit the flag. Benchmarks and the mains run at XLA's default level.
    if "--xla_backend_optimization_level" not in _flags:
        _flags += " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = _flags.strip()

# One persistent XLA compilation cache for the run, shared by the xdist workers and every program
# a test starts (they inherit the environment): the suite compiles the same tiny-model steps in
# many processes. Made by the controlling process, removed when the run ends. A compiled program
# from the cache is the same program, so results do not change.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    import tempfile

    _OWN_CACHE = tempfile.mkdtemp(prefix="jaxpost-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    # With a size limit JAX takes a file lock around every read and write of the cache; without
    # one it writes entries in place, and a worker reading an entry another process is still
    # writing deserializes half a program (seen 2026-12-02: "Fatal Python error: Aborted" in
    # an xdist worker). 8 GB is never reached by the suite.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    _check_groups_apply(config, items)
    _skip_accelerator_tests(items)


def _check_groups_apply(config, items) -> None:
    """Under `--dist loadgroup` xdist tags each grouped test's id with its group; a pytest whose
    ids it cannot tag would spread the groups (and rebuild their fixtures) silently."""
    if not getattr(config.option, "loadgroup", False):
        return
    lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(f"--dist loadgroup ignored the xdist_group of {lost[0]} (and "
                                f"{len(lost) - 1} more): install the pinned test extra")  # fmt: skip


def _skip_accelerator_tests(items) -> None:
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(
        reason="compiled on a GPU or TPU only: run JAXPOST_TEST_BACKEND=accelerator "
        "pytest -m accelerator on one (this backend is the CPU)"
    )
    for item in items:
        if "accelerator" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    """The fast tier (`-m "not slow"`) is unit tests: one that starts a program must be marked
    slow, and this makes it fail until it is."""
    if request.node.get_closest_marker("slow") is None:
        import subprocess

        def refuse(*args, **kwargs):
            raise AssertionError("a test not marked slow started a subprocess: mark it "
                                 "@pytest.mark.slow (the fast tier starts no programs)")  # fmt: skip

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
