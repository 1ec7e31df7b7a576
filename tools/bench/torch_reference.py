"""The PyTorch side of `python -m tools.bench`: our 3D-LLM's train step and greedy generation
rebuilt from transformers' `Blip2QFormerModel` and `T5ForConditionalGeneration` with the shapes
of an `llm3d_jax.model.llm3d.LLM3DConfig`.

Imported only when `import torch` works; torch never enters llm3d_jax/ or data_pipeline/.

The computation is the one `LLM3D` does (module doc of llm3d_jax/model/llm3d.py):
    features [B,N,D] + 0.01 * sin/cos 3D position embedding(voxels)
    -> Q-Former (learned queries cross-attend to the points, point_mask) -> Linear -> [B,Q,d_model]
    -> T5 encoder over [queries; embed(prompt_ids)], decoder over the answer shifted right
    -> logits [B,La, loc_offset + loc_bins]
with the location-token rows as separate tensors (`loc_embed`, `loc_head`). The train step is
AdamW (0.9, 0.999; weight decay 0.05 on matrices only) after global-norm clipping at 1.0, over the
same trainable set as `llm3d.TRAINABLE`: Q-Former, query tokens, projection, location rows; T5
stays frozen. Dropout is on in training, as in our step. Weights are random: only time matters.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    T5ForConditionalGeneration,
)
from transformers import T5Config as HFT5Config

VERSIONS = f"torch {torch.__version__}, transformers {transformers.__version__}"
DEFAULT_THREADS = torch.get_num_threads()


def sincos_table(num_positions: int, channels: int) -> np.ndarray:
    """docs/reference.md: inv_freq_k = 1 / 10000^(2k / C'), [sin, cos] interleaved, cut to C."""
    even = channels + channels % 2
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, even, 2, dtype=np.float64) / even))
    angles = np.arange(num_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    table = np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(num_positions, even)
    return table[:, :channels].astype(np.float32)


def hf_t5_config(llm, vocab_size: int) -> HFT5Config:
    """transformers T5Config with the shapes of our `T5Config` and the given vocabulary."""
    if llm.gated and llm.activation != "gelu_new":
        raise ValueError(f"no transformers T5 feed-forward for gated {llm.activation!r}")
    return HFT5Config(
        vocab_size=vocab_size,
        d_model=llm.d_model,
        d_kv=llm.d_kv,
        d_ff=llm.d_ff,
        num_layers=llm.num_layers,
        num_decoder_layers=llm.num_decoder_layers,
        num_heads=llm.num_heads,
        relative_attention_num_buckets=llm.relative_attention_num_buckets,
        relative_attention_max_distance=llm.relative_attention_max_distance,
        dropout_rate=llm.dropout_rate,
        layer_norm_epsilon=llm.layer_norm_epsilon,
        feed_forward_proj="gated-gelu" if llm.gated else llm.activation,
        tie_word_embeddings=llm.tie_word_embeddings,
        decoder_start_token_id=llm.decoder_start_token_id,
        pad_token_id=llm.pad_token_id,
        eos_token_id=llm.eos_token_id,
    )


class TorchLLM3D(torch.nn.Module):
    """features [B,N,D], voxels [B,N,3], point_mask [B,N], prompt_ids / prompt_mask [B,Lp],
    answer_ids / answer_mask [B,La] -> logits [B,La,V] (teacher forcing), like `LLM3D`."""

    def __init__(self, config):
        super().__init__()
        q, llm = config.qformer, config.llm
        if config.posembed_mode != "add":
            raise ValueError("the PyTorch reference implements posembed_mode 'add' only")
        self.config = config
        self.qformer = Blip2QFormerModel(
            Blip2QFormerConfig(
                hidden_size=q.hidden_size,
                num_hidden_layers=q.num_hidden_layers,
                num_attention_heads=q.num_attention_heads,
                intermediate_size=q.intermediate_size,
                cross_attention_frequency=q.cross_attention_frequency,
                encoder_hidden_size=q.encoder_hidden_size,
                layer_norm_eps=q.layer_norm_eps,
                hidden_dropout_prob=q.hidden_dropout_prob,
                attention_probs_dropout_prob=q.attention_probs_dropout_prob,
            )
        )
        self.query_tokens = torch.nn.Parameter(
            q.initializer_range * torch.randn(1, q.num_query_tokens, q.hidden_size)
        )
        self.proj = torch.nn.Linear(q.hidden_size, llm.d_model)
        self.offset = llm.loc_offset if llm.loc_bins else llm.vocab_size
        self.t5 = T5ForConditionalGeneration(hf_t5_config(llm, llm.vocab_size))
        self.t5.requires_grad_(False)
        if llm.loc_bins:  # trainable location rows, as `llm/loc_embed` and `llm/loc_head`
            self.loc_embed = torch.nn.Embedding(llm.loc_bins, llm.d_model)
            self.loc_head = torch.nn.Linear(llm.d_model, llm.loc_bins, bias=False)
        c = config.feature_dim // 3
        self.register_buffer("pos_table", torch.from_numpy(sincos_table(256, c)))

    def embed(self, ids):
        """Token ids [B,L] -> [B,L,d_model]: base rows below `offset`, location rows above."""
        if not self.config.llm.loc_bins:
            return self.t5.shared(ids)
        base = self.t5.shared(ids.clamp(max=self.offset - 1))
        loc = self.loc_embed((ids - self.offset).clamp(min=0))
        return torch.where((ids >= self.offset)[..., None], loc, base)

    def prefix(self, features, voxels, point_mask, prompt_ids, prompt_mask):
        """-> (T5 encoder input [B,Q+Lp,d_model] = [queries; prompt embeds], its mask [B,Q+Lp])."""
        pe = torch.cat([self.pos_table[voxels[..., i]] for i in range(3)], dim=-1)
        pe = F.pad(pe, (0, features.shape[-1] - pe.shape[-1]))
        points = features + self.config.posembed_scale * pe
        queries = self.qformer(
            query_embeds=self.query_tokens.expand(features.shape[0], -1, -1),
            encoder_hidden_states=points,
            encoder_attention_mask=point_mask,
        ).last_hidden_state
        queries = self.proj(queries)
        embeds = torch.cat([queries, self.embed(prompt_ids)], dim=1)
        mask = torch.cat([torch.ones(queries.shape[:2], dtype=prompt_mask.dtype), prompt_mask], 1)
        return embeds, mask

    def forward(
        self, features, voxels, point_mask, prompt_ids, prompt_mask, answer_ids, answer_mask
    ):
        embeds, mask = self.prefix(features, voxels, point_mask, prompt_ids, prompt_mask)
        encoded = self.t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        start = torch.full_like(answer_ids[:, :1], self.config.llm.decoder_start_token_id)
        decoder_ids = torch.cat([start, answer_ids[:, :-1]], dim=1)
        hidden = self.t5.decoder(
            inputs_embeds=self.embed(decoder_ids),
            attention_mask=answer_mask,
            encoder_hidden_states=encoded,
            encoder_attention_mask=mask,
        ).last_hidden_state
        logits = self.t5.lm_head(hidden)[..., : self.offset]
        if self.config.llm.loc_bins:
            logits = torch.cat([logits, self.loc_head(hidden)], dim=-1)
        return logits


def _tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Host numpy batch (keys of llm3d_jax.train.step.MODEL_INPUTS) -> torch tensors."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype == np.bool_ or np.issubdtype(value.dtype, np.integer):
            value = value.astype(np.int64)
        out[key] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def _median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fastest_threads(fn, repeats: int, warmup: int) -> tuple[float, int]:
    """-> (median seconds, intra-op threads) of the faster of 1 thread and torch's default.

    On a loaded machine torch's OpenMP threads can wait on each other for orders of magnitude
    longer than the work (a tiny model: 15 ms forward on 1 thread, 1-3 s on 2 threads at load
    10 on 2 cores); the reference gets whichever setting serves it best.
    """
    results = []
    for threads in sorted({1, DEFAULT_THREADS}):
        torch.set_num_threads(threads)
        results.append((_median_seconds(fn, repeats, warmup), threads))
    torch.set_num_threads(DEFAULT_THREADS)
    return min(results)


def train_step_seconds(config, batch: dict[str, np.ndarray], repeats: int) -> tuple[float, int]:
    """-> (median seconds of one AdamW train step of `TorchLLM3D(config)` on `batch`, warm-up
    excluded; the intra-op thread count it ran with)."""
    torch.manual_seed(0)
    model = TorchLLM3D(config).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": 0.05},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-4,
        betas=(0.9, 0.999),
    )
    t = _tensors(batch)
    mask = t["answer_mask"].float()

    def step():
        logits = model(**t)
        ce = F.cross_entropy(logits.flatten(0, 1), t["answer_ids"].flatten(), reduction="none")
        loss = (ce * mask.flatten()).sum() / mask.sum().clamp(min=1.0)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optim.step()

    return _fastest_threads(step, repeats, warmup=2)


def generation_t5(model: TorchLLM3D) -> T5ForConditionalGeneration:
    """A plain T5 whose vocabulary holds the base and the location rows (same shapes as ours),
    so that `generate` scores all `loc_offset + loc_bins` tokens at every step."""
    llm = model.config.llm
    if not llm.loc_bins:
        return model.t5
    t5 = T5ForConditionalGeneration(hf_t5_config(llm, model.offset + llm.loc_bins)).eval()
    state = model.t5.state_dict()
    state["shared.weight"] = torch.cat(
        [state["shared.weight"][: model.offset], model.loc_embed.weight]
    )
    state["lm_head.weight"] = torch.cat(
        [state["lm_head.weight"][: model.offset], model.loc_head.weight]
    )
    for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state[key] = state["shared.weight"]
    t5.load_state_dict(state, strict=False)
    return t5


def generate_seconds(config, inputs: dict[str, np.ndarray], max_new_tokens: int, repeats: int):
    """Median seconds of greedy generation of exactly `max_new_tokens` tokens per row: our 3D
    prefix (position embedding, Q-Former, projection, prompt embedding) then transformers'
    `generate` (KV cache) with EOS suppressed so every row runs the full length.
    -> (seconds, the intra-op thread count it ran with)."""
    torch.manual_seed(0)
    model = TorchLLM3D(config).eval()
    t5 = generation_t5(model)
    t = _tensors(inputs)

    @torch.inference_mode()
    def run():
        prompt = {k: v for k, v in t.items() if k not in ("answer_ids", "answer_mask")}
        embeds, mask = model.prefix(**prompt)
        ids = t5.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
        if ids.shape[1] != 1 + max_new_tokens:  # the start token, then the answer
            raise RuntimeError(f"generate returned {ids.shape[1] - 1} tokens, not {max_new_tokens}")

    return _fastest_threads(run, repeats, warmup=1)
