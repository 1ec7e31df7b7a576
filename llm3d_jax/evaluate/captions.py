"""Caption / QA text metrics with the standard `pycocoevalcap` scorers (ScanQA conventions).

Predictions and references are PTB-tokenised together in one Java call (lowercased,
punctuation removed), then scored with BLEU-1..4 (corpus level, "closest" reference length),
METEOR 1.5 (one JVM for the whole corpus), ROUGE-L (beta 1.2) and CIDEr-D (sigma 6, IDF from the
evaluated references). EM and refined EM are computed on the raw strings (see `answers`).
All scores x100, the way papers report them.
"""

from __future__ import annotations

import shutil

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from llm3d_jax.evaluate.answers import answer_metrics, check_ids

CAPTION_METRIC_NAMES = (
    "BLEU-1",
    "BLEU-2",
    "BLEU-3",
    "BLEU-4",
    "METEOR",
    "ROUGE-L",
    "CIDEr",
    "EM",
    "EM-refined",
)


def require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption metrics need Java on PATH (pycocoevalcap's PTB tokenizer and METEOR 1.5 are "
            "Java programs); install a JRE, e.g. `apt-get install default-jre-headless` (make setup)"
        )


def ptb_tokenize(
    groups: dict[str, tuple[dict[str, str], dict[str, list[str]]]],
) -> dict[str, tuple[dict[str, list[str]], dict[str, list[str]]]]:
    """PTB-tokenises the predictions and references of every group in a single Java call.

    groups: name -> (preds, refs). Returns name -> (res, gts) in pycocoevalcap's layout:
    id -> [tokenised prediction] and id -> [tokenised references].
    """
    require_java()
    batch = {}
    for name, (preds, refs) in groups.items():
        batch.update({("pred", name, k): [{"caption": v}] for k, v in preds.items()})
        batch.update({("ref", name, k): [{"caption": r} for r in v] for k, v in refs.items()})
    tokens = PTBTokenizer().tokenize(batch)
    return {
        name: (
            {k: tokens[("pred", name, k)] for k in preds},
            {k: tokens[("ref", name, k)] for k in refs},
        )
        for name, (preds, refs) in groups.items()
    }


def caption_metrics_by_group(
    groups: dict[str, tuple[dict[str, str], dict[str, list[str]]]],
) -> dict[str, dict[str, float]]:
    """`caption_metrics` of several corpora (name -> (preds, refs)), each scored on its own,
    with one PTB tokenizer call and one METEOR JVM for all of them."""
    for name, (preds, refs) in groups.items():
        check_ids(preds, refs)
        if not preds:
            raise ValueError(f"caption_metrics needs at least one prediction (group {name!r})")
    tokenized = ptb_tokenize(groups)
    meteor = Meteor()
    try:
        out = {}
        for name, (res, gts) in tokenized.items():
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            rouge, _ = Rouge().compute_score(gts, res)
            cider, _ = Cider().compute_score(gts, res)
            scores = {f"BLEU-{n + 1}": 100.0 * b for n, b in enumerate(bleu)}
            scores["METEOR"] = 100.0 * meteor.compute_score(gts, res)[0]
            scores["ROUGE-L"] = 100.0 * rouge
            scores["CIDEr"] = 100.0 * cider
            scores.update(answer_metrics(*groups[name]))
            out[name] = {k: float(scores[k]) for k in CAPTION_METRIC_NAMES}
    finally:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.wait()
    return out


def caption_metrics(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr, EM, EM-refined (x100) of `preds` against `refs`.

    preds: id -> generated text; refs: id -> reference texts (at least one). Both must hold
    the same ids.
    """
    return caption_metrics_by_group({"": (preds, refs)})[""]
