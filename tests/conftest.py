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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if TIER == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(
        reason="compiled on a GPU or TPU only: run JAXPOST_TEST_BACKEND=accelerator "
        "pytest -m accelerator on one (this backend is the CPU)"
    )
    for item in items:
        if "accelerator" in item.keywords:
            item.add_marker(skip)
