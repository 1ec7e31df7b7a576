"""3DMV-VQA fine-tuning of 3D-LLM on BLIP-2 FlanT5-XL, with the released fine-tuning settings.

    python experiments/train.py --config experiments/configs/3dmv_vqa_flant5xl.py --workdir RUN \
        --config.model.pretrained=MODEL --config.data_dir=TFDS_DIR --config.total_steps=N

MODEL: a HF BLIP-2 FlanT5-XL directory, or (as the release does: it resumes from its pretrained
3D-LLM checkpoint) a model exported from a pretrain_mixture.py run (tools/export.py). TFDS_DIR
holds the `3dmv_vqa` config: `python -m data_pipeline.language --import 3dmv_vqa` of
train_questions.json (--split train) and test_questions.json (--split val), one records file,
then `python -m data_pipeline.tfds --config 3dmv_vqa` (docs/training.md).

The release (3DLLM_BLIP2-base/lavis/projects/blip2/train/finetune_3dmvvqa.yaml): AdamW, lr 1e-4
after a 1000-step linear warmup, cosine down to 1e-5, weight decay 0.05; 100 epochs at 2
questions per GPU on 16 GPUs (a global batch of 32); answers up to 40 tokens, greedy (its
`predict_answers` sets num_beams = 1 whatever the yaml says). It validates on
test_questions.json, the file calculate_score_3dmvvqa.py scores per question type
(`python -m llm3d_jax.evaluate --task 3dmv_vqa`).

total_steps: the release's 100 epochs are `release_total_steps(train records)`, the train count
of TFDS_DIR/build_report.3dmv_vqa.json (counts.records.train); the default below is ScanQA's
step count, not the release's schedule.
"""

import math

from experiments.configs import scanqa_flant5xl

RELEASE_EPOCHS = 100
RELEASE_BATCH = 32  # batch_size_train 2 x world_size 16


def release_total_steps(train_records: int) -> int:
    """Steps of the release's 100 epochs at its global batch of 32."""
    return math.ceil(RELEASE_EPOCHS * train_records / RELEASE_BATCH)


def get_config():
    c = scanqa_flant5xl.get_config()
    c.data.datasets = "3dmv_vqa"
    c.data.answer_len = 40  # max_len 40
    c.batch_size = RELEASE_BATCH
    c.eval_batch_size = RELEASE_BATCH
    c.optim.lr = 1e-4  # init_lr
    c.optim.min_lr = 1e-5
    c.optim.warmup_steps = 1000
    c.optim.weight_decay = 0.05
    return c
