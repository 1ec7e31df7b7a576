"""Throughput and MFU, and where metrics go: JSONL, TensorBoard, a loss-curve PNG.

MFU = model FLOPs per step / (step time x peak FLOP/s of all devices). Model FLOPs come from the
config (`llm3d_flops`); the peak comes from a device table for GPUs/TPUs and, on CPU, from a
jitted float32 matmul measured in this process (the CPU has no datasheet number worth trusting).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

from llm3d_jax.fileio import write_jsonl_atomic
from llm3d_jax.model.decoder import DecoderConfig
from llm3d_jax.model.t5 import T5Config

# Dense bf16 peak FLOP/s per device (datasheet, without sparsity), matched on device_kind.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def measure_cpu_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 [size,size] matmul on the first device (whole host on CPU)."""
    x = jax.device_put(jnp.ones((size, size), jnp.float32), jax.local_devices()[0])
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops() -> tuple[float, str]:
    """-> (peak FLOP/s of all devices together, where the number comes from)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        # Simulated CPU devices share the host's cores: the host peak is the total.
        return measure_cpu_peak_flops(), "measured f32 matmul on this host"
    for name, flops in PEAK_FLOPS:
        if name.lower() in device.device_kind.lower():
            return flops * jax.device_count(), f"datasheet bf16 {name} x {jax.device_count()}"
    raise ValueError(
        f"no peak FLOP/s known for device {device.device_kind!r}; add it to PEAK_FLOPS"
    )


def _attention_flops(q_len, kv_len, width):
    """Scores and weighted sum: two [q_len, kv_len] x width matmuls."""
    return 2 * 2 * q_len * kv_len * width


def _t5_flops(t5, enc_len, dec_len):
    inner = t5.num_heads * t5.d_kv
    ffn_mats = 3 if t5.gated else 2
    enc_layer = (
        2 * enc_len * 4 * t5.d_model * inner
        + _attention_flops(enc_len, enc_len, inner)
        + 2 * enc_len * ffn_mats * t5.d_model * t5.d_ff
    )
    dec_layer = (
        2 * dec_len * 4 * t5.d_model * inner  # self attention q k v o
        + _attention_flops(dec_len, dec_len, inner)
        + 2 * dec_len * 2 * t5.d_model * inner  # cross attention q o
        + 2 * enc_len * 2 * t5.d_model * inner  # cross attention k v (over the encoder output)
        + _attention_flops(dec_len, enc_len, inner)
        + 2 * dec_len * ffn_mats * t5.d_model * t5.d_ff
    )
    lm_head = 2 * dec_len * t5.d_model * t5.num_logits
    return t5.num_layers * enc_layer + t5.num_decoder_layers * dec_layer + lm_head


def _qformer_flops(qf, num_queries, num_points):
    h, n = qf.hidden_size, num_queries
    per_layer = 2 * n * 4 * h * h + _attention_flops(n, n, h) + 2 * n * 2 * h * qf.intermediate_size
    cross = (
        2 * n * 2 * h * h  # q, o
        + 2 * num_points * 2 * qf.encoder_hidden_size * h  # k, v over the points
        + _attention_flops(n, num_points, h)
    )
    num_cross = len(range(0, qf.num_hidden_layers, qf.cross_attention_frequency))
    return qf.num_hidden_layers * per_layer + num_cross * cross


def _decoder_flops(dec, seq_len, logits_len):
    """A decoder-only LLM (`DecoderConfig`) over `seq_len` slots, logits at `logits_len` of them.
    Attention is counted over the whole [seq_len, seq_len] square, as for T5 (XLA computes the
    masked half too)."""
    d, q_width, kv_width = (
        dec.hidden_size,
        dec.num_heads * dec.head_dim,
        dec.num_kv_heads * dec.head_dim,
    )
    ffn_mats = 3 if dec.family == "llama" else 2  # gate, up, down | fc1, fc2
    layer = (
        2 * seq_len * 2 * d * q_width  # q, o
        + 2 * seq_len * 2 * d * kv_width  # k, v (fewer heads with GQA)
        + _attention_flops(seq_len, seq_len, q_width)
        + 2 * seq_len * ffn_mats * d * dec.intermediate_size
    )
    projections = 0
    if dec.token_dim != d:  # OPT project_in over every slot, project_out where logits are read
        projections = 2 * seq_len * dec.token_dim * d + 2 * seq_len * d * dec.token_dim
    lm_head = 2 * logits_len * dec.token_dim * dec.num_logits
    return dec.num_layers * layer + projections + lm_head


def llm_flops(llm, prefix_len: int, answer_len: int) -> float:
    """Forward FLOPs of one example of the 3D-LLM's language model, either family: T5 encodes
    the prefix and decodes the answer; a decoder-only LLM runs [prefix; answer] as one sequence."""
    if isinstance(llm, T5Config):
        return _t5_flops(llm, prefix_len, answer_len)
    if isinstance(llm, DecoderConfig):
        return _decoder_flops(llm, prefix_len + answer_len, answer_len)
    raise TypeError(f"no FLOP count for LLM config {type(llm).__name__}")


def llm3d_flops(qformer, llm, num_points: int, prompt_len: int, answer_len: int) -> float:
    """Training FLOPs of one example of a 3D-LLM (`QFormerConfig`, and a `T5Config` or a
    `DecoderConfig`): 3 x the forward matmul FLOPs (a backward pass costs twice the forward),
    the usual MFU convention, counted for the whole model whether a weight is frozen or not."""
    q = qformer.num_query_tokens
    width = llm.d_model if isinstance(llm, T5Config) else llm.token_dim
    forward = (
        _qformer_flops(qformer, q, num_points)
        + 2 * q * qformer.hidden_size * width
        + llm_flops(llm, q + prompt_len, answer_len)
    )
    return 3.0 * forward


def format_memory(stats) -> str:
    """XLA's `compiled.memory_analysis()` in GiB (None on backends that do not report it)."""
    if stats is None:
        return "not reported by this backend"
    gib = 1 << 30
    return (
        f"arguments {stats.argument_size_in_bytes / gib:.3f} GiB, "
        f"outputs {stats.output_size_in_bytes / gib:.3f} GiB, "
        f"temporaries {stats.temp_size_in_bytes / gib:.3f} GiB, "
        f"aliased (donated) {stats.alias_size_in_bytes / gib:.3f} GiB"
    )


class MetricWriter:
    """One JSON object per logged step in `metrics.jsonl` and TensorBoard scalars; only
    process 0 writes. On resume, rows past the restored step are dropped first, so the file
    reads as one run."""

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.enabled:
            return
        if os.path.exists(self.path):
            kept = [r for r in read_jsonl(self.path) if r["step"] <= resume_step]
            write_jsonl_atomic(self.path, kept)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step":
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: str) -> list[dict]:
    """Rows of a metrics file; a torn last line (killed mid-write) is dropped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def plot_loss(metrics_path: str, png_path: str) -> None:
    """Training (and validation, when logged) loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
