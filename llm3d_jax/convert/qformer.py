"""Mapping tables: HF BLIP-2 / LAVIS / HF BERT checkpoints -> `llm3d_jax.model.qformer` params.

Flax layout of a Q-Former (`dst` prefix, e.g. "" or "qformer/" inside a bigger model):
  query_tokens [1,Q,H], layernorm/{scale,bias},
  layer_<i>/attention/{query,key,value,out}/{kernel,bias}, layer_<i>/attention/norm/{scale,bias},
  layer_<i>/crossattention/... (every cross_attention_frequency-th layer),
  layer_<i>/mlp/{intermediate,output}/{kernel,bias}, layer_<i>/mlp/norm/{scale,bias}.
`BertEncoder` adds word_embeddings / position_embeddings / token_type_embeddings /embedding and
embeddings_norm. torch Linear weights are [out, in]: `transpose` turns them into Dense kernels.

The three checkpoint layouts of one Q-Former layer:
  HF BLIP-2:   attention.attention.query / attention.output.{dense,LayerNorm} /
               crossattention.attention.* / intermediate_query.dense / output_query.{dense,LayerNorm}
  LAVIS:       attention.self.query / ... / crossattention.self.* / intermediate_query / output_query
  BERT:        attention.self.query / ... / intermediate.dense / output.{dense,LayerNorm}
               (BERT's FFN fills the query FFN; cross-attention stays freshly initialised.)
"""

from __future__ import annotations

from llm3d_jax.convert.hf import Rule, transpose

# Q-Former params a BERT checkpoint cannot provide (regexes over "/"-joined Flax paths).
FRESH_FROM_BERT = (r"query_tokens", r"layer_\d+/crossattention/.*")


def _norm_rules(src: str, dst: str) -> list[Rule]:
    """torch LayerNorm (weight|gamma, bias|beta) -> Flax LayerNorm (scale, bias)."""
    return [
        (src + r"\.(?:weight|gamma)", dst + "/scale", None),
        (src + r"\.(?:bias|beta)", dst + "/bias", None),
    ]


def _dense_rules(src: str, dst: str) -> list[Rule]:
    return [(src + r"\.weight", dst + "/kernel", transpose), (src + r"\.bias", dst + "/bias", None)]


def _layer_rules(
    src: str, dst: str, attention: dict[str, tuple[str, str]], ffn: tuple[str, str]
) -> list[Rule]:
    """Rules of `src`encoder.layer.<i>.* -> `dst`layer_<i>/*.

    attention: Flax block name -> (torch q/k/v module, torch output module), e.g.
    {"attention": ("attention.self", "attention.output")}; ffn: (intermediate, output) modules.
    """
    layer, out = src + r"encoder\.layer\.(\d+)\.", dst + r"layer_\1/"
    rules: list[Rule] = []
    for block, (qkv, output) in attention.items():
        qkv, output = qkv.replace(".", r"\."), output.replace(".", r"\.")
        rules += [
            (layer + qkv + r"\.(query|key|value)\.weight", out + block + r"/\2/kernel", transpose),
            (layer + qkv + r"\.(query|key|value)\.bias", out + block + r"/\2/bias", None),
            *_dense_rules(layer + output + r"\.dense", out + block + "/out"),
            *_norm_rules(layer + output + r"\.LayerNorm", out + block + "/norm"),
        ]
    intermediate, output = (m.replace(".", r"\.") for m in ffn)
    rules += [
        *_dense_rules(layer + intermediate + r"\.dense", out + "mlp/intermediate"),
        *_dense_rules(layer + output + r"\.dense", out + "mlp/output"),
        *_norm_rules(layer + output + r"\.LayerNorm", out + "mlp/norm"),
    ]
    return rules


def blip2_qformer_rules(
    src: str = r"(?:model\.)?qformer\.", dst: str = "", query_tokens: str = r"(?:model\.)?"
) -> list[Rule]:
    """HF `Blip2ForConditionalGeneration` / `Blip2Model` keys -> Q-Former params.

    Keys of the vision tower and the language model are dropped (other tables read them); so is
    the Q-Former's text branch (embeddings, text FFN `intermediate` / `output`).
    """
    return [
        (query_tokens + r"query_tokens", dst + "query_tokens", None),
        *_norm_rules(src + r"layernorm", dst + "layernorm"),
        *_layer_rules(
            src,
            dst,
            {
                "attention": ("attention.attention", "attention.output"),
                "crossattention": ("crossattention.attention", "crossattention.output"),
            },
            ("intermediate_query", "output_query"),
        ),
        (src + r"embeddings\..*", None, None),
        (src + r"encoder\.layer\.\d+\.(?:intermediate|output)\..*", None, None),
        (
            r"(?:model\.)?(?:vision_model|language_model|language_projection|lm_head)\..*",
            None,
            None,
        ),
    ]


def lavis_qformer_rules(src: str = r"Qformer\.bert\.", dst: str = "") -> list[Rule]:
    """LAVIS `Blip2Base` keys (`Qformer.bert.*`, `query_tokens`) -> Q-Former params.

    The LayerNorm LAVIS applies to the query embeddings is `bert.embeddings.LayerNorm`.
    """
    return [
        (r"query_tokens", dst + "query_tokens", None),
        *_norm_rules(src + r"embeddings\.LayerNorm", dst + "layernorm"),
        *_layer_rules(
            src,
            dst,
            {
                "attention": ("attention.self", "attention.output"),
                "crossattention": ("crossattention.self", "crossattention.output"),
            },
            ("intermediate_query", "output_query"),
        ),
        (src + r"embeddings\.(?:word_embeddings|position_embeddings|position_ids).*", None, None),
        (src + r"encoder\.layer\.\d+\.(?:intermediate|output)\..*", None, None),
        (r"Qformer\.cls\..*", None, None),
    ]


def bert_qformer_rules(src: str = r"(?:bert\.)?", dst: str = "") -> list[Rule]:
    """HF BERT keys -> Q-Former params (FFN into the query FFN; see FRESH_FROM_BERT)."""
    return [
        *_norm_rules(src + r"embeddings\.LayerNorm", dst + "layernorm"),
        *_layer_rules(
            src,
            dst,
            {"attention": ("attention.self", "attention.output")},
            ("intermediate", "output"),
        ),
        (src + r"embeddings\.(?:word|position|token_type)_embeddings\..*", None, None),
        (src + r"embeddings\.position_ids", None, None),
        (src + r"pooler\..*", None, None),
        (r"cls\..*", None, None),
    ]


def bert_encoder_rules(src: str = r"(?:bert\.)?", dst: str = "") -> list[Rule]:
    """HF BERT keys -> `BertEncoder` params (pooler and pre-training heads dropped)."""
    return [
        (
            src + r"embeddings\.(word|position|token_type)_embeddings\.weight",
            dst + r"\1_embeddings/embedding",
            None,
        ),  # fmt: skip
        *_norm_rules(src + r"embeddings\.LayerNorm", dst + "embeddings_norm"),
        *_layer_rules(
            src,
            dst,
            {"attention": ("attention.self", "attention.output")},
            ("intermediate", "output"),
        ),
        (src + r"embeddings\.position_ids", None, None),
        (src + r"pooler\..*", None, None),
        (r"cls\..*", None, None),
    ]
