import jax
import pytest


@pytest.fixture
def float32_matmuls():
    """fp32 parity needs true fp32 dots (GPUs default to TF32, ~2e-3 off); no-op on CPU.
    Modules that compare against fp32 goldens use it with `pytest.mark.usefixtures`."""
    with jax.default_matmul_precision("highest"):
        yield
