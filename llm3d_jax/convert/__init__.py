"""Checkpoint conversion: HF safetensors directories and LAVIS .pth files -> Flax params.

Each model family has a mapping table (HF key regex -> Flax param path template, per-tensor
hook); `hf.apply_rules` applies one table to the tensors of `hf.read_hf_dir`.
"""
