"""Shared pytest set-up: every test process sees 8 simulated CPU devices."""

import os

# Must happen before jax is imported anywhere in the test process.
# Cheap CPU compiles (about 3x faster; same float semantics): tests compile far more than they run.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDENS = os.path.join(REPO, "tests", "goldens")


@pytest.fixture(scope="session")
def goldens_dir():
    return GOLDENS
