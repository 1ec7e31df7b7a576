"""Evaluation metrics: caption/QA text scores, exact match variants, 3D grounding, navigation."""

from llm3d_jax.evaluate.answers import (
    SQA3D_QUESTION_TYPES,
    SQA3D_RELEASE_QUESTION_TYPES,
    answer_metrics,
    em_by_question_type,
    exact_match,
    last_question,
    normalize_answer,
    normalized_exact_match,
    refined_exact_match,
    release_clean_answer,
    release_exact_match,
    sqa3d_question_type,
    sqa3d_release_question_type,
    strip_locations,
)
from llm3d_jax.evaluate.captions import (
    CAPTION_METRIC_NAMES,
    caption_metrics,
    caption_metrics_by_group,
)
from llm3d_jax.evaluate.grounding import box_iou, grounding_metrics
from llm3d_jax.evaluate.navigation import navigation_metrics

__all__ = [
    "CAPTION_METRIC_NAMES",
    "SQA3D_QUESTION_TYPES",
    "SQA3D_RELEASE_QUESTION_TYPES",
    "answer_metrics",
    "box_iou",
    "caption_metrics",
    "caption_metrics_by_group",
    "em_by_question_type",
    "exact_match",
    "grounding_metrics",
    "last_question",
    "navigation_metrics",
    "normalize_answer",
    "normalized_exact_match",
    "refined_exact_match",
    "release_clean_answer",
    "release_exact_match",
    "sqa3d_question_type",
    "sqa3d_release_question_type",
    "strip_locations",
]
