"""The one LLM interface the 3D-LLM drives (model/llm3d.py's docstring): T5 and every decoder
family answer the same calls with the same meaning, so llm3d.py needs no family branches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm3d_jax.model import llm3d
from llm3d_jax.model.decoder import DecoderConfig
from llm3d_jax.model.t5 import T5Config

CONFIGS = {
    "t5": lambda: T5Config.tiny(vocab_size=64, loc_offset=64, loc_bins=16),
    "llama": lambda: DecoderConfig.tiny("llama", vocab_size=64, loc_offset=64, loc_bins=16),
    "opt": lambda: DecoderConfig.tiny("opt", vocab_size=64, loc_offset=64, loc_bins=16),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_teacher_forcing_equals_prefill_then_decode_steps(family):
    config = CONFIGS[family]()
    module = llm3d.LLMS[type(config)](config)
    rng = np.random.default_rng(0)
    prefix = jnp.asarray(rng.normal(size=(2, 5, config.token_dim)), jnp.float32)
    prefix_mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    answer = jnp.asarray(rng.integers(2, config.num_logits, size=(2, 3)), jnp.int32)
    answer_mask = jnp.ones((2, 3), bool)
    variables = module.init(
        jax.random.key(0), prefix, prefix_mask, answer, answer_mask, method="answer_logits"
    )
    forced = module.apply(
        variables, prefix, prefix_mask, answer, answer_mask, method="answer_logits"
    )
    assert forced.shape == (2, 3, config.num_logits)
    cache, logits = module.apply(variables, prefix, prefix_mask, 3, method="prefill_embeds")
    for t in range(3):
        np.testing.assert_allclose(logits, forced[:, t], atol=2e-5, err_msg=f"answer slot {t}")
        logits, cache = module.apply(variables, cache, answer[:, t], method="decode_step")
    assert config.forward_flops(5, 3) > config.forward_flops(5, 2) > 0
