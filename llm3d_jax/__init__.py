"""llm3d_jax: a JAX/Flax reimplementation of 3D-LLM (docs/architecture.md)."""

import os

# transformers' import-time advice ("PyTorch was not found ...") is noise to users of the CLIs,
# which use transformers for tokenizers only. Set here, before any module imports transformers.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
