r"""Exports a training run as a self-contained model directory.

    python tools/export.py --workdir RUN --out MODEL [--checkpoint RUN/checkpoints/300]
        [--bf16] [--safetensors]

MODEL gets the merged frozen + trained params (orbax, or one model.safetensors), the model config,
the tokenizer with its location tokens, and what inference needs (points per scene, prompt and
answer lengths, prompt templates); layout in `llm3d_jax.infer.exported`. Load it with
`llm3d_jax.loading.load_llm3d(MODEL)` or ask it with `tools/ask.py --model MODEL`.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm3d_jax import loading, tokens  # noqa: E402
from llm3d_jax.fileio import InputError, check_output_file, cli_main, writing  # noqa: E402
from llm3d_jax.infer import exported, restore  # noqa: E402
from llm3d_jax.model.llm3d import EXPORTED_CONFIG  # noqa: E402


def prompt_templates(config) -> dict:
    """{task: template} of the run's first dataset, when its TFDS folder is still there."""
    from llm3d_jax.data.pipeline import parse_mixture
    from llm3d_jax.data.sources import dataset_metadata

    data_dir = config.get("data_dir", "")
    if config.get("data_source", "tfds") != "tfds" or not os.path.isdir(data_dir or ""):
        return {}
    templates = {}
    for name, _ in reversed(parse_mixture(config.data.datasets)):
        try:
            templates.update(dataset_metadata(data_dir, name).get("prompt_templates", {}))
        except (FileNotFoundError, OSError, ValueError):
            continue
    templates.update(dict(config.data.get("prompt_templates", None) or {}))
    return templates


def export_run(run_path: str, out: str, bf16: bool = False, safetensors: bool = False) -> dict:
    """Restores `run_path` (run, checkpoints or step folder) and writes the export -> its config."""
    from llm3d_jax.data.pipeline import load_tokenizer

    run = restore.load_run(run_path)
    llm = run.module.config.llm
    tokenizer = None
    if run.config.get("data_source", "tfds") == "tfds" or run.config.model.pretrained:
        tokenizer = load_tokenizer(run.tokenizer_path)
        offset = tokens.add_location_tokens(tokenizer, llm.loc_bins)
        if offset != llm.loc_offset:
            raise InputError(
                run.tokenizer_path,
                f"tokenizer puts <loc0> at {offset}, the model at {llm.loc_offset}",
            )
    data = run.config.data
    inference = {
        "num_points": int(data.num_points),
        "prompt_len": int(data.prompt_len),
        "answer_len": int(data.answer_len),
        "eos_id": int(llm.eos_token_id),
        "pad_id": int(llm.pad_token_id),
        "prompt_templates": prompt_templates(run.config),
        # "release": questions and points the released 3D-LLM's way (tools/ask.py)
        "profile": run.config.get("profile", "ours"),
    }
    source = {"run": os.path.abspath(run_path), "step": int(run.step)}
    with writing(out):
        exported.export(
            out,
            run.module,
            run.params,
            tokenizer=tokenizer,
            inference=inference,
            source=source,
            params_dtype="bfloat16" if bf16 else "float32",
            params_format="safetensors" if safetensors else "orbax",
        )
    return loading.read_exported_config(out)


def main(argv=None) -> int:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's per-step INFO lines
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", help="run folder of experiments/train.py")
    parser.add_argument("--checkpoint", help="a checkpoints folder or one step folder")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--bf16", action="store_true", help="store params in bfloat16")
    parser.add_argument("--safetensors", action="store_true", help="one model.safetensors file")
    args = parser.parse_args(argv)
    if not (args.workdir or args.checkpoint):
        raise InputError(None, "pass --workdir RUN (or --checkpoint DIR)")
    check_output_file(args.out, folder=True)
    if os.path.exists(args.out) and not os.path.exists(os.path.join(args.out, EXPORTED_CONFIG)):
        raise InputError(args.out, "exists and is not an exported model; refusing to replace it")
    description = export_run(args.checkpoint or args.workdir, args.out, args.bf16, args.safetensors)
    print(
        f"wrote {args.out}: step {description['source']['step']}, "
        f"{description['params_dtype']} params ({description['params_format']})"
    )
    return 0


if __name__ == "__main__":
    cli_main(main)
