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
from llm3d_jax.model import attention

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


def _qformer_flops(qf, num_queries, num_points):
    h, n = qf.hidden_size, num_queries
    per_layer = 2 * n * 4 * h * h + attention.flops(n, n, h) + 2 * n * 2 * h * qf.intermediate_size
    cross = (
        2 * n * 2 * h * h  # q, o
        + 2 * num_points * 2 * qf.encoder_hidden_size * h  # k, v over the points
        + attention.flops(n, num_points, h)
    )
    num_cross = len(range(0, qf.num_hidden_layers, qf.cross_attention_frequency))
    return qf.num_hidden_layers * per_layer + num_cross * cross


def llm3d_flops(qformer, llm, num_points: int, prompt_len: int, answer_len: int) -> float:
    """Training FLOPs of one example of a 3D-LLM (`QFormerConfig`, and any LLM config of the
    interface: `token_dim`, `forward_flops`): 3 x the forward matmul FLOPs (a backward pass costs
    twice the forward), the usual MFU convention, counted for the whole model whether a weight is
    frozen or not."""
    q = qformer.num_query_tokens
    forward = (
        _qformer_flops(qformer, q, num_points)
        + 2 * q * qformer.hidden_size * llm.token_dim
        + llm.forward_flops(q + prompt_len, answer_len)
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
