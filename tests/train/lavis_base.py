"""The BLIP-2 base directory the tiny LAVIS fixture (tests/goldens/lavis/lavis_tiny.pth) was
fine-tuned from, as a run needs it: tests/goldens/qformer/blip2_tiny plus a tokenizer of 60
tokens, so `<loc0>` is id 60 as in the fixture (a real FlanT5 directory has its 32100-token
tokenizer). Made in a test folder in well under a second."""

from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDENS = os.path.join(REPO, "tests", "goldens")
LAVIS = os.path.join(GOLDENS, "lavis")
BLIP2_TINY = os.path.join(GOLDENS, "qformer", "blip2_tiny")
LOC_OFFSET = 60


def step_settings() -> dict:
    """`STEP` of tools/make_lavis_fixture.py and the PyTorch loss (lavis_step.json)."""
    with open(os.path.join(LAVIS, "lavis_step.json"), encoding="utf-8") as f:
        return json.load(f)


def make_base(out_dir: str, words=()) -> str:
    """blip2_tiny's files (linked) and a word-level tokenizer: `<pad>` 0, `</s>` 1 (appended),
    `<unk>` 2, then `words` and filler up to 60 entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(BLIP2_TINY):
        os.symlink(os.path.join(BLIP2_TINY, name), os.path.join(out_dir, name))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in [*words, *(f"w{i}" for i in range(LOC_OFFSET))]:
        if len(vocab) == LOC_OFFSET:
            break
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    hf.save_pretrained(out_dir)
    assert len(hf) == LOC_OFFSET
    return out_dir
