"""Path -> (module, params), for every place weights come from. The one loading layer.

| function | reads |
|---|---|
| `load_vit` | HF Blip2VisionModel / CLIPVisionModel, or a full BLIP-2 / CLIP directory |
| `load_trained_vit` | a directory written by `save_trained_vit` (tools/train_encoder.py) |
| `load_qformer` | HF BLIP-2 (its Q-Former), or BERT (a fresh Q-Former started from it) |
| `load_bert` | HF BERT |
| `load_t5` | HF T5 / FlanT5 |
| `load_decoder` | HF OPT / Llama / Qwen2 / Mistral causal LM (sharded safetensors fine) |
| `load_llm3d` | HF BLIP-2 (+ an LLM from another HF directory), an exported directory (tools/export.py), or a released LAVIS `.pth` over its BLIP-2 base |
| `load_lavis` | a released LAVIS `.pth` over its BLIP-2 base, optionally with its AdamW state |
| `load_exported_bundle` | an exported directory, with its tokenizer and config file |

A training run directory (latest checkpoint) is restored by `llm3d_jax.infer.restore.load_run`:
its frozen weights are rebuilt from the run config (`llm3d_jax.train.setup.build_model`), which
calls back into this module.

Layering (docs/architecture.md, checked by `lint-imports`): `llm3d_jax.model` holds configs and
modules and reads no files; `llm3d_jax.convert` maps foreign tensors onto model params; this
module picks the converter for a path; `data`, `train`, `infer` and `evaluate` build on it.
Bad files are `InputError`s naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save

from llm3d_jax import tokens
from llm3d_jax.convert import blip2 as blip2_convert
from llm3d_jax.convert import decoder as decoder_convert
from llm3d_jax.convert import hf as hf_convert
from llm3d_jax.convert import lavis as lavis_convert
from llm3d_jax.convert import qformer as qformer_convert
from llm3d_jax.convert import t5 as t5_convert
from llm3d_jax.convert import vit as vit_convert
from llm3d_jax.fileio import InputError, write_bytes_atomic, write_text_atomic
from llm3d_jax.model import attention, decoder, llm3d, qformer, t5, vit

# Exported model directories (written by llm3d_jax.infer.exported.export).
EXPORTED_FORMAT = "llm3d_jax.exported"
EXPORTED_VERSION = 1
EXPORTED_PARAMS_DIR = "params"
EXPORTED_SAFETENSORS = "model.safetensors"
EXPORTED_PARAMS_FORMATS = ("orbax", "safetensors")
EXPORTED_PARAMS_DTYPES = ("float32", "bfloat16")


# ---------------------------------------------------------------------- ViT


def load_vit(path: str | os.PathLike, kind: str | None = None) -> tuple[vit.ViT, dict]:
    """(module, params) from a local HF directory: Blip2VisionModel, CLIPVisionModel, or a full
    BLIP-2 / CLIP directory (its `vision_model`). `kind` ("blip2" | "clip") demands that layout:
    a directory of another kind is an `InputError`."""
    config, params = vit_convert.load_vit(path, kind=kind)
    return vit.ViT(config), params


def save_trained_vit(directory: str | os.PathLike, config: vit.ViTConfig, params: dict) -> None:
    """Writes `config.json` (the ViTConfig fields) and `model.safetensors` (float32 params under
    their "/"-joined paths), each atomically: what `load_trained_vit` (`--encoder vit:DIR`) reads."""
    os.makedirs(directory, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
    write_bytes_atomic(os.path.join(directory, "model.safetensors"), save(tensors))
    write_text_atomic(
        os.path.join(directory, "config.json"), json.dumps(dataclasses.asdict(config), indent=1)
    )


def load_trained_vit(directory: str | os.PathLike) -> tuple[vit.ViT, dict]:
    """(module, params) of a directory written by `save_trained_vit`; a missing or bad file, or
    a tensor whose name or shape does not fit the config, is an InputError naming the file."""
    config_path = os.path.join(directory, "config.json")
    weights_path = os.path.join(directory, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise InputError(path, "file not found (expected a directory from save_trained_vit)")
    try:
        with open(config_path, encoding="utf-8") as f:
            fields = json.load(f)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        config = vit.ViTConfig(**fields)
    except (ValueError, TypeError) as err:
        raise InputError(config_path, f"not a ViTConfig: {err}") from None
    try:
        tensors = load_file(weights_path)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise InputError(weights_path, f"unreadable safetensors file: {err}") from None
    want = traverse_util.flatten_dict(vit.param_shapes(config), sep="/")
    if set(tensors) != set(want):
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        raise InputError(
            weights_path,
            f"tensors do not fit the config: missing {missing[:3]}, unexpected {extra[:3]}",
        )
    for name, shape in want.items():
        if tensors[name].shape != shape.shape:
            raise InputError(
                weights_path, f"{name} has shape {tensors[name].shape}, config needs {shape.shape}"
            )
    params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in tensors.items()}, sep="/")
    return vit.ViT(config), params


# ---------------------------------------------------------------------- Q-Former, BERT


def _check_bert_like(config: dict, path: str) -> None:
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise InputError(path, f"unsupported hidden_act {act!r} (only exact 'gelu' is implemented)")
    pos = config.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise InputError(path, f"unsupported position_embedding_type {pos!r}")


def load_qformer(
    path: str | os.PathLike, seed: int = 0, **overrides
) -> tuple[qformer.QFormer, dict]:
    """(QFormer, params) from a HF BLIP-2 directory, or from a BERT directory.

    BLIP-2 (`model_type` "blip-2"): its `qformer.*` and `query_tokens` (vision tower and language
    model are ignored). BERT (`model_type` "bert"): self-attention and the FFN (copied into the
    query FFN) come from BERT, cross-attention and query tokens are freshly initialised with
    `seed`, as BLIP-2 starts its Q-Former from bert-base. `overrides` replace config fields.
    """
    path = os.fspath(path)
    config = hf_convert.read_config(path)
    model_type = config.get("model_type")
    if model_type == "blip-2":
        _check_bert_like(config.get("qformer_config") or {}, os.path.join(path, "config.json"))
        cfg = qformer.QFormerConfig.from_hf(config, **overrides)
        rules, fresh = qformer_convert.blip2_qformer_rules(), ()
        keep = r"(model\.)?(qformer\.|query_tokens)"  # skip the vision tower and the LLM
    elif model_type == "bert":
        _check_bert_like(config, os.path.join(path, "config.json"))
        cfg = qformer.QFormerConfig.from_hf(config, **overrides)
        rules, fresh = qformer_convert.bert_qformer_rules(), qformer_convert.FRESH_FROM_BERT
        keep = None
    else:
        raise InputError(
            os.path.join(path, "config.json"),
            f"unknown architecture model_type={model_type!r} (expected 'blip-2' or 'bert')",
        )
    _, tensors = hf_convert.read_hf_dir(path, keep=keep)
    module = qformer.QFormer(cfg)
    target = qformer.init_params(module, seed) if fresh else qformer.param_shapes(module)
    params = hf_convert.apply_rules(tensors, rules, target, source=path, allow_missing=fresh)
    return module, jax.tree.map(jnp.asarray, params)


def load_bert(path: str | os.PathLike, **overrides) -> tuple[qformer.BertEncoder, dict]:
    """(BertEncoder, params) from a HF BERT directory (BertModel or BertFor* layouts)."""
    path = os.fspath(path)
    config = hf_convert.read_config(path)
    if config.get("model_type") != "bert":
        raise InputError(
            os.path.join(path, "config.json"),
            f"unknown architecture model_type={config.get('model_type')!r} (expected 'bert')",
        )
    _check_bert_like(config, os.path.join(path, "config.json"))
    cfg = qformer.BertConfig.from_hf(config, **overrides)
    _, tensors = hf_convert.read_hf_dir(path)
    module = qformer.BertEncoder(cfg)
    params = hf_convert.apply_rules(
        tensors, qformer_convert.bert_encoder_rules(), qformer.param_shapes(module), source=path
    )
    return module, jax.tree.map(jnp.asarray, params)


# ---------------------------------------------------------------------- LLMs


def load_t5(
    path: str | os.PathLike,
    loc_bins: int = 0,
    loc_offset: int | None = None,
    dtype: str = "float32",
    **overrides: Any,
) -> tuple[t5.T5, dict]:
    """(module, params) from a local HF T5 / FlanT5 directory (config.json + safetensors).

    With `loc_bins > 0` the model gains location-token rows (ids loc_offset.., default
    loc_offset = vocab_size), initialised by `t5.init_location_rows`. `overrides` are T5Config
    fields (remat, scan_layers, ...).
    """
    config, tensors = hf_convert.read_hf_dir(path)
    arch = config.get("architectures") or ["T5ForConditionalGeneration"]
    if config.get("model_type") not in (None, "t5") or arch[0] != "T5ForConditionalGeneration":
        raise InputError(
            os.path.join(os.fspath(path), "config.json"),
            f"unsupported architecture {arch[0]} (model_type {config.get('model_type')}); "
            "expected T5ForConditionalGeneration",
        )
    return t5_convert.t5_params(
        config,
        tensors,
        source=os.fspath(path),
        loc_bins=loc_bins,
        loc_offset=loc_offset,
        dtype=dtype,
        **overrides,
    )


def load_decoder(
    path: str | os.PathLike,
    loc_bins: int = 0,
    loc_offset: int | None = None,
    dtype: str = "float32",
    **overrides: Any,
) -> tuple[decoder.Decoder, dict]:
    """(module, params) from a local HF OPT / Llama / Qwen2 / Mistral causal-LM directory
    (config.json + model.safetensors, or shards listed by model.safetensors.index.json).

    With `loc_bins > 0` the model gains location-token rows (ids loc_offset.., default
    loc_offset = vocab_size). `overrides` are DecoderConfig fields (remat, scan_layers, ...).
    """
    config, tensors = hf_convert.read_hf_dir(path)
    return decoder_convert.decoder_params(
        config,
        tensors,
        source=os.fspath(path),
        loc_bins=loc_bins,
        loc_offset=loc_offset,
        dtype=dtype,
        **overrides,
    )


# ---------------------------------------------------------------------- 3D-LLM


def load_llm3d(
    path: str | os.PathLike,
    loc_bins: int = llm3d.DEFAULT_LOC_BINS,
    dtype: str = "float32",
    llm_path: str | os.PathLike | None = None,
    lavis_base: str | os.PathLike | None = None,
    reinit: tuple[str, ...] = (),
) -> tuple[llm3d.LLM3D, dict]:
    """(module, host params) of a whole 3D-LLM, from
    - a directory written by tools/export.py (recognised by its `llm3d_config.json`);
    - a released 3D-LLM LAVIS checkpoint (`.pth`), overlaid on the HF BLIP-2 FlanT5 directory
      `lavis_base` it was fine-tuned from (`llm3d_jax.convert.lavis`);
    - a HF BLIP-2 directory (FlanT5 or OPT language model): Q-Former, query tokens, projection
      and LLM from the checkpoint (vision tower unused); new location-token rows (`loc_bins`);
      when the directory has a tokenizer, `loc_offset` is where
      `llm3d_jax.tokens.add_location_tokens` puts `<loc0>` in it, else the LLM vocab size.
      `llm_path`: take the LLM (and tokenizer) from this HF T5 / OPT / Llama / Qwen2 / Mistral
      directory instead; the projection is then freshly initialised.
    `reinit` (regexes over "/"-joined param paths, an export only): those params are not read
    and need not match (`llm3d.grow_params` initialises them afresh).
    """
    path = os.fspath(path)
    if path.endswith(".pth"):
        if lavis_base is None:
            raise InputError(
                path, "a LAVIS checkpoint needs its BLIP-2 base directory (lavis_base)"
            )
        return load_lavis(path, lavis_base, dtype=dtype)
    for folder in (path, lavis_base, llm_path):
        if folder is not None and os.path.isdir(folder):
            tokens.refuse_remote_code(folder)  # model folders come from strangers: never their code
    if os.path.exists(os.path.join(path, llm3d.EXPORTED_CONFIG)):
        return load_exported(path, reinit=reinit)
    if reinit:
        raise InputError(path, "reinit: only for an exported model (tools/export.py)")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise InputError(
            path, "a training run: restore it with llm3d_jax.infer.restore.load_run (or export it)"
        )
    return blip2_convert.load_blip2(path, loc_bins=loc_bins, dtype=dtype, llm_path=llm_path)


def load_lavis(
    path: str | os.PathLike,
    base: str | os.PathLike,
    dtype: str = "float32",
    with_optimizer: bool = False,
):
    """A released 3D-LLM LAVIS checkpoint (`.pth`, read without torch or pickle code) over the HF
    BLIP-2 FlanT5 directory `base` -> (module, host params); `with_optimizer`: (module, params,
    `convert.lavis.LavisMoments` or None), its AdamW state in the params' layout."""
    if os.path.isdir(base):
        tokens.refuse_remote_code(base)
    return lavis_convert.from_lavis(path, base, dtype=dtype, with_optimizer=with_optimizer)


def relayout_llm_layers(params: dict, config: llm3d.LLM3DConfig, scan_layers: bool) -> dict:
    """Whole-model params of `config` -> the same values in the `scan_layers` layout of the LLM
    blocks (stacked on a leading axis for nn.scan, or one subtree per block). Loaders read the
    unscanned layout; this is how a scanned model gets its weights (and an exported scanned model
    its unscanned ones)."""
    llm_config = config.llm
    if llm_config.scan_layers == scan_layers:
        return params
    if isinstance(llm_config, t5.T5Config):
        stack, unstack = t5_convert.stack_blocks, t5_convert.unstack_blocks
        llm = (stack if scan_layers else unstack)(params["llm"], llm_config)
    else:
        stack, unstack = hf_convert.stack_layers, hf_convert.unstack_layers
        llm = (stack if scan_layers else unstack)(params["llm"], llm_config.num_layers)
    return {**params, "llm": llm}


# ---------------------------------------------------------------------- exported directories


def read_exported_config(model_dir: str) -> dict:
    """The parsed `llm3d_config.json` of an exported directory (layout: llm3d_jax.infer.exported)."""
    path = os.path.join(model_dir, llm3d.EXPORTED_CONFIG)
    if not os.path.exists(path):
        raise InputError(model_dir, f"not an exported model directory (no {llm3d.EXPORTED_CONFIG})")
    try:
        with open(path, encoding="utf-8") as f:
            description = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(path, f"unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(description, dict) or description.get("format") != EXPORTED_FORMAT:
        raise InputError(path, f"not a {EXPORTED_FORMAT} config")
    if description.get("version") != EXPORTED_VERSION:
        raise InputError(
            path,
            f"format version {description.get('version')} (this code reads {EXPORTED_VERSION})",
        )
    if description.get("params_format") not in EXPORTED_PARAMS_FORMATS:
        raise InputError(path, f"unknown params_format {description.get('params_format')!r}")
    if description.get("params_dtype", "float32") not in EXPORTED_PARAMS_DTYPES:
        raise InputError(path, f"unknown params_dtype {description.get('params_dtype')!r}")
    check_inference(path, description.get("inference", {}))
    model = description.get("model")
    if not isinstance(model, dict):
        raise InputError(path, "model: expected an object (LLM3DConfig.to_dict())")
    check_model_config(path, model)
    return description


# Integer settings that must be at least 1 (sizes, counts); other integers (ids, offsets,
# loc_bins, OPT's embed_dim) may be 0. Every integer is capped: a config from a stranger must
# not make tracing the model take hours or its abstract params exabytes.
# Float fields of an exported config that may be negative (a rating logit threshold).
_SIGNED_FLOATS = ("target_threshold",)
_POSITIVE_INTS = (
    "size",
    "layers",
    "heads",
    "d_model",
    "d_kv",
    "d_ff",
    "head_dim",
    "num_query_tokens",
    "num_buckets",
    "max_distance",
    "max_position_embeddings",
    "cross_attention_frequency",
    "feature_dim",
    "num_points",
)
_MAX_INT = 1 << 22
_MAX_LAYERS = 1024
INFERENCE_INTS = {"num_points": 1, "prompt_len": 1, "answer_len": 1, "eos_id": 0, "pad_id": 0}


def _check_int(path: str, name: str, value, minimum: int, maximum: int = _MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(path, f"{name}: expected an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise InputError(path, f"{name}: {value} is outside [{minimum}, {maximum}]")


def check_model_config(path: str, model: dict, prefix: str = "model") -> None:
    """Types and ranges of `llm3d_config.json`'s model dict against the config dataclasses'
    fields (their defaults give the type), before any of it reaches a constructor."""
    import dataclasses

    from llm3d_jax.model import llm3d
    from llm3d_jax.model.decoder import DecoderConfig
    from llm3d_jax.model.qformer import QFormerConfig
    from llm3d_jax.model.t5 import T5Config

    def check(cls, values: dict, where: str) -> None:
        for field in dataclasses.fields(cls):
            if field.name not in values or field.name in ("qformer", "llm"):
                continue
            name, value = f"{where}.{field.name}", values[field.name]
            if field.name == "attention_impl":
                if value not in attention.IMPLEMENTATIONS:
                    choices = ", ".join(str(v) for v in attention.IMPLEMENTATIONS)
                    raise InputError(path, f"{name}: expected one of {choices}, got {value!r}")
                continue
            default = (
                field.default
                if field.default is not dataclasses.MISSING
                else field.default_factory()
            )
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise InputError(path, f"{name}: expected true or false, got {value!r}")
            elif isinstance(default, int):
                positive = any(p in field.name for p in _POSITIVE_INTS) and (
                    field.name != "embed_dim"
                )
                top = _MAX_LAYERS if "layers" in field.name else _MAX_INT
                _check_int(path, name, value, 1 if positive else 0, top)
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(path, f"{name}: expected a number, got {value!r}")
                if field.name in _SIGNED_FLOATS:
                    if not np.isfinite(value):
                        raise InputError(path, f"{name}: {value} must be a finite number")
                elif not np.isfinite(value) or value < 0:
                    raise InputError(path, f"{name}: {value} must be a finite number >= 0")
            elif isinstance(default, str):
                if not isinstance(value, str):
                    raise InputError(path, f"{name}: expected a string, got {value!r}")
            elif isinstance(default, tuple):
                if not isinstance(value, (list, tuple)):
                    raise InputError(path, f"{name}: expected a list, got {value!r}")
                for v in value:
                    _check_int(path, name, v, 0)

    for key, cls in (("qformer", QFormerConfig), ("llm", None)):
        sub = model.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise InputError(path, f"{prefix}.{key}: expected an object, got {sub!r}")
        if cls is None:
            cls = DecoderConfig if "family" in sub else T5Config
        check(cls, sub, f"{prefix}.{key}")
    check(llm3d.LLM3DConfig, model, prefix)


def check_inference(path: str, inference) -> None:
    """The `inference` block: positive lengths, non-negative ids, templates as strings."""
    if not isinstance(inference, dict):
        raise InputError(path, f"inference: expected an object, got {inference!r}")
    for key, minimum in INFERENCE_INTS.items():
        if key in inference:
            _check_int(path, f"inference.{key}", inference[key], minimum)
    templates = inference.get("prompt_templates", {})
    if not isinstance(templates, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in templates.items()
    ):
        raise InputError(path, "inference.prompt_templates: expected {task: template string}")


def load_exported(model_dir: str, reinit=()) -> tuple[llm3d.LLM3D, dict]:
    """-> (module, params) of an exported directory (`reinit`: load_exported_bundle)."""
    module, params, _, _ = load_exported_bundle(model_dir, with_tokenizer=False, reinit=reinit)
    return module, params


def load_exported_bundle(model_dir: str, with_tokenizer: bool = True, reinit=()):
    """-> (module, params, tokenizer or None, config file dict) of an exported directory.
    float32 exports reload bit-identical; bfloat16 ones hold bfloat16 params. The config file is
    checked field by field and the params against the model's abstract params before use.
    Params whose path matches a `reinit` regex are left out (read from no file, checked
    against nothing)."""
    # Absolute: orbax refuses relative checkpoint paths, and users type `--model demo_out/model`.
    model_dir = os.path.abspath(os.fspath(model_dir))
    tokens.refuse_remote_code(model_dir)
    description = read_exported_config(model_dir)
    config_path = os.path.join(model_dir, llm3d.EXPORTED_CONFIG)
    try:
        module = llm3d.LLM3D(llm3d.LLM3DConfig.from_dict(dict(description["model"])))
        expected = llm3d.abstract_params(module)
    except Exception as err:  # a constructor's or the model's own shape check: a bad config
        problem = " ".join(str(err).split())[:200]
        raise InputError(
            config_path, f"bad model config ({type(err).__name__}: {problem})"
        ) from None
    params = _read_exported_params(model_dir, description["params_format"])
    if reinit:
        params, expected = (_without(tree, reinit) for tree in (params, expected))
    check_params(model_dir, params, expected, description.get("params_dtype", "float32"))
    tokenizer = None
    if with_tokenizer and os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
        tokenizer = tokens.load_tokenizer(model_dir)
    return module, params, tokenizer, description


def _without(params: dict, patterns) -> dict:
    """params without the leaves whose "/"-joined path fully matches one of `patterns`."""
    flat = traverse_util.flatten_dict(params)
    keep = {
        k: v for k, v in flat.items() if not any(re.fullmatch(p, "/".join(k)) for p in patterns)
    }
    return traverse_util.unflatten_dict(keep)


def check_params(model_dir: str, params: dict, expected: dict, params_dtype: str) -> None:
    """Params read from an export against the model's abstract params: the same paths and
    shapes, the dtype the config file names, finite values; InputError naming the export."""
    want = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(expected).items()}
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    got = {k: v.shape for k, v in flat.items()}
    if want != got:
        missing = sorted(set(want) - set(got))[:3]
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:3]
        raise InputError(
            model_dir,
            f"params do not match the model config (missing {missing}, wrong shape {wrong}, "
            f"{len(set(got) - set(want))} unexpected)",
        )
    dtype = np.dtype(jax.numpy.bfloat16 if params_dtype == "bfloat16" else np.float32)
    for name, value in flat.items():
        if value.dtype != dtype:
            raise InputError(
                model_dir, f"param {name} is {value.dtype}, the config says {params_dtype}"
            )
        if not np.isfinite(value.astype(np.float32)).all():
            raise InputError(model_dir, f"param {name} holds non-finite values (NaN or Inf)")


def _read_exported_params(model_dir: str, params_format: str) -> dict:
    model_dir = os.path.abspath(model_dir)  # orbax takes absolute paths only
    if params_format == "safetensors":
        path = os.path.join(model_dir, EXPORTED_SAFETENSORS)
        if not os.path.exists(path):
            raise InputError(model_dir, f"incomplete export: {EXPORTED_SAFETENSORS} missing")
        try:
            flat = load_file(path)
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise InputError(path, f"unreadable ({type(err).__name__}: {err})") from None
        return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    path = os.path.abspath(os.path.join(model_dir, EXPORTED_PARAMS_DIR))  # orbax wants absolute
    if not os.path.isdir(path):
        raise InputError(model_dir, f"incomplete export: {EXPORTED_PARAMS_DIR}/ missing")
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path)
            tree = getattr(metadata, "item_metadata", metadata)
            tree = getattr(tree, "tree", tree)
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree
            )
            params = checkpointer.restore(path, abstract)
    except Exception as err:  # any layer (json, tensorstore, ocdbt) of a damaged folder
        raise InputError(
            path, f"unreadable params ({type(err).__name__}: {str(err)[:300]})"
        ) from None
    return jax.tree.map(np.asarray, params)
