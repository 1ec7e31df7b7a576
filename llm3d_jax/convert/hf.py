"""Reading HF-format directories (config.json + safetensors) and applying mapping tables.

A mapping table is a list of `(hf_key_regex, flax_path_template, hook)`:
- the regex must match the whole HF key; the template may use `\\1`-style groups and separates
  Flax path parts with `/` (e.g. `encoder/layer_\\1/attention/query/kernel`);
- `hook` is None or a function `np.ndarray -> np.ndarray` (transpose, reshape, row slice);
- a template of None drops the key on purpose (e.g. a text branch we do not use).
The first matching rule wins. An HF key that no rule matches, a Flax parameter nobody filled and a
shape that disagrees are all `InputError`s naming the key and the shapes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from safetensors import safe_open

from llm3d_jax.fileio import InputError

Hook = Callable[[np.ndarray], np.ndarray] | None
Rule = tuple[str, str | None, Hook]


def transpose(x: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return np.ascontiguousarray(x.T)


def read_config(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise InputError(path, "checkpoint directory not found")
    if not os.path.exists(config_path):
        raise InputError(config_path, "missing config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise InputError(config_path, f"not valid JSON ({err})") from None


def read_safetensors(path: str | os.PathLike, keep: str | None = None) -> dict[str, np.ndarray]:
    """Tensors of a HF directory: model.safetensors, or shards listed by an index file.

    `keep`: a regex; only keys it matches (re.match) are read, so taking the Q-Former out of a
    BLIP-2 FlanT5-XL folder does not read the 3B language model.
    """
    path = os.fspath(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise InputError(path, "no *.safetensors weights (only safetensors checkpoints are read)")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise InputError(file, "weight shard listed in the index is missing")
        try:
            with safe_open(file, framework="numpy") as f:
                for key in f.keys():
                    if keep is None or re.match(keep, key):
                        tensors[key] = f.get_tensor(key)
        except Exception as err:
            raise InputError(file, f"unreadable safetensors file ({err})") from None
    return tensors


def read_hf_dir(
    path: str | os.PathLike, keep: str | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, {hf_key: float32-or-int array}) of a local HF directory; `keep` as above."""
    config = read_config(path)
    tensors = read_safetensors(path, keep)
    # bf16/fp16 checkpoints are upcast: params are float32 (compute dtype is a config choice).
    tensors = {
        k: v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v
        for k, v in tensors.items()
    }
    return config, tensors


def _set(tree: dict, path: Sequence[str], value: np.ndarray) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, (*prefix, k)))
        return out
    return {prefix: tree}


def apply_rules(
    tensors: dict[str, np.ndarray],
    rules: Sequence[Rule],
    target: dict,
    source: str = "checkpoint",
    allow_missing: Sequence[str] = (),
    fill_missing: bool = True,
) -> dict:
    """Maps HF tensors onto the structure of `target` (a nested dict of arrays or ShapeDtypeStructs).

    `allow_missing`: regexes over `/`-joined Flax paths that may stay unfilled (they keep the
    value from `target`, which then must be a real array: freshly initialised layers; with
    `fill_missing=False` they are left out, so the result holds only what the tensors gave).
    """
    compiled = [(re.compile(rx), tmpl, hook) for rx, tmpl, hook in rules]
    expected = _flatten(target)
    out: dict = {}
    filled: set[tuple[str, ...]] = set()
    for key in sorted(tensors):
        for rx, tmpl, hook in compiled:
            m = rx.fullmatch(key)
            if m is None:
                continue
            if tmpl is None:
                break
            path = tuple(m.expand(tmpl).split("/"))
            value = np.asarray(tensors[key])
            if hook is not None:
                value = hook(value)
            if path not in expected:
                raise InputError(
                    source, f"key {key} maps to {'/'.join(path)}, which the model does not have"
                )
            want = tuple(expected[path].shape)
            if tuple(value.shape) != want:
                raise InputError(
                    source,
                    f"shape mismatch for {key}: checkpoint {tuple(tensors[key].shape)} "
                    f"(converted {tuple(value.shape)}) vs model {'/'.join(path)} {want}",
                )
            _set(out, path, value.astype(expected[path].dtype))
            filled.add(path)
            break
        else:
            raise InputError(source, f"unexpected key {key} (no conversion rule)")
    allowed = [re.compile(rx) for rx in allow_missing]
    missing = []
    for path, leaf in expected.items():
        if path in filled:
            continue
        if any(rx.fullmatch("/".join(path)) for rx in allowed):
            if fill_missing:
                _set(out, path, np.asarray(leaf))
        else:
            missing.append("/".join(path))
    if missing:
        raise InputError(
            source, f"missing weights for {len(missing)} parameters, e.g. {missing[:3]}"
        )
    return out


def stack_layers(params: dict, num_layers: int, name: str = "layers") -> dict:
    """`{name}_0` .. `{name}_{n-1}` subtrees -> one `{name}` subtree with a leading layer axis
    (the nn.scan layout). Host numpy arrays out."""
    params = dict(params)
    per_layer = [params.pop(f"{name}_{i}") for i in range(num_layers)]
    params[name] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
    return params


def unstack_layers(params: dict, num_layers: int, name: str = "layers") -> dict:
    """The inverse of `stack_layers`: one `{name}` subtree [layers, ...] -> `{name}_<i>` subtrees."""
    params = dict(params)
    stacked = params.pop(name)
    for leaf in jax.tree.leaves(stacked):
        if leaf.shape[0] != num_layers:
            raise ValueError(f"{name}: leading axis {leaf.shape[0]} != {num_layers} layers")
    for i in range(num_layers):
        params[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params
