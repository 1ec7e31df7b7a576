"""Generation with the real 3D-LLM (tiny FlanT5 config): KV-cached decoding == full forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm3d_jax.infer.decode import DecodeConfig
from llm3d_jax.infer.generate import generate
from llm3d_jax.model import llm3d

MAX_NEW = 5


@pytest.fixture(scope="module")
def model():
    module = llm3d.LLM3D(llm3d.LLM3DConfig.tiny())
    params = llm3d.init_params(module, seed=0)
    rng = np.random.default_rng(0)
    b, n, lp = 3, 16, 10
    lengths = np.array([10, 4, 7])
    inputs = dict(
        features=rng.normal(size=(b, n, module.config.feature_dim)).astype(np.float32),
        voxels=rng.integers(0, 256, (b, n, 3)).astype(np.int32),
        point_mask=np.arange(n)[None] < np.array([[16], [9], [12]]),
        prompt_ids=rng.integers(2, module.config.llm.loc_offset, (b, lp)).astype(np.int32),
        prompt_mask=np.arange(lp)[None] < lengths[:, None],
    )
    return module, params, inputs


def _full_forward_greedy(module, params, inputs, max_new, eos):
    apply = jax.jit(module.apply)
    b = len(inputs["prompt_ids"])
    answer = np.zeros((b, max_new), np.int32)
    done = np.zeros(b, bool)
    for t in range(max_new):
        logits = apply(
            {"params": params},
            **inputs,
            answer_ids=jnp.asarray(answer),
            answer_mask=jnp.ones((b, max_new), bool),
        )
        tok = np.where(done, 0, np.asarray(logits[:, t]).argmax(-1))
        answer[:, t] = tok
        done |= tok == eos
    return answer


def test_greedy_equals_argmax_of_full_forwards(model):
    module, params, inputs = model
    eos = module.config.llm.eos_token_id
    config = DecodeConfig(max_new_tokens=MAX_NEW, eos_id=eos, pad_id=module.config.llm.pad_token_id)
    ids, _ = generate(module, params, inputs, config)
    np.testing.assert_array_equal(ids, _full_forward_greedy(module, params, inputs, MAX_NEW, eos))
    # Bucketing (3 -> 4 rows, 10 -> 16 prompt columns) and batching do not change a row.
    one, _ = generate(module, params, {k: v[1:2] for k, v in inputs.items()}, config)
    np.testing.assert_array_equal(one[0], ids[1])

    beam1, _ = generate(
        module,
        params,
        inputs,
        DecodeConfig(strategy="beam", num_beams=1, max_new_tokens=MAX_NEW, eos_id=eos),
    )
    np.testing.assert_array_equal(beam1, ids)
