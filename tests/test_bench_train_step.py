"""tools/bench/train_step.py times the step experiments/train.py compiles, on the synthetic
batches it feeds (the bench once compiled for the TFDS pipeline's batch and could not run)."""

from llm3d_jax.model import llm3d
from tools.bench import train_step


def test_speed_bench_runs_the_compiled_step_on_its_batches(capsys):
    cfg = llm3d.LLM3DConfig.tiny()
    train_step.bench_speed("tiny", cfg, 8, (16, 8, 4), "float32", 1, peak=1e12)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("tiny") and "tokens/s" in line and "MFU" in line, line
