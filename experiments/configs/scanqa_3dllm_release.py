"""ScanQA fine-tuning exactly as the released 3D-LLM code does it (`profile = "release"`), from a
released LAVIS checkpoint.

    python experiments/train.py --config experiments/configs/scanqa_3dllm_release.py \
        --workdir RUN --config.model.pretrained=/path/to/pretrain_blip2_sam_flant5xl_v2.pth \
        --config.model.base=/path/to/blip2-flan-t5-xl --config.data_dir=TFDS_DIR

What the profile switches (UMass-Foundation-Model/3D-LLM, 3DLLM_BLIP2-base/lavis: the
finetune_scanqa.yaml run, ThreeDVQADataset, Blip2T5, LinearWarmupCosineLRScheduler):
- prompt: the bare question, lower-cased, `.!"()*#:;~` deleted, at most 50 words (no "Question:
  ... Answer:" template);
- points: the first 5000 rows of each scene's file (what its `torch.sort(torch.randperm(N)
  [:5000])[1]` selects, whatever the draw), fewer zero-padded, and no point mask;
- answers: every distinct answer of a question is its own training row;
- model: exact GELU in the T5 FFN; the T5's whole input embedding table and LM head train
  (weight decay 0.05) besides the Q-Former, queries, projection;
- lr: 1e-4 -> 1e-5 cosine stepped per epoch after a per-step linear warm-up from 1e-8 over 1000
  steps within epoch 0 (`optim.steps_per_epoch` must be less than that: the warm-up is cut
  off, as in the release).
The numbers here are the yaml's: batch 2 questions on each of 16 GPUs, 100 epochs, AdamW (0.9,
0.999), weight decay 0.05, no gradient clipping. An epoch is 799 steps: ScanQA's 25,563 training
questions spread over 16 ranks, 2 per step (the README launches 8 processes: 1598 steps of 16).

Still not the release (docs/training.md, "The release profile"): it stacks the rows of a step's
32 questions (so a step has >= 32 rows), ours are 32 rows; its loss is a mean over each GPU's
tokens averaged over GPUs, ours one mean over the batch's tokens; it computes in fp16 autocast
with a loss scaler, ours in bf16. Resuming a checkpoint, LAVIS also resumes its epoch counter
(the .pth's `epoch` + 1): `optim.first_epoch` reproduces that (no warm-up, fewer epochs left).
"""

from experiments.configs import scanqa_flant5xl


def get_config():
    c = scanqa_flant5xl.get_config()
    c.profile = "release"
    c.seed = 42
    c.batch_size = 32  # 16 GPUs x batch_size_train 2
    # A released 3D-LLM checkpoint (.pth, e.g. pretrain_blip2_sam_flant5xl_v2.pth), and the HF
    # BLIP-2 FlanT5-XL directory under it (the frozen T5 body and the tokenizer).
    c.model.pretrained = ""
    c.model.base = ""
    c.optim.update(
        lr=1e-4,  # init_lr
        min_lr=1e-5,
        warmup_lr=1e-8,
        warmup_steps=1000,
        max_epoch=100,
        steps_per_epoch=799,
        first_epoch=0,
        weight_decay=0.05,
        grad_clip=0.0,  # none
    )
    c.total_steps = c.optim.max_epoch * c.optim.steps_per_epoch
    # The release validates and saves once per epoch.
    c.eval_every = c.checkpoint_every = c.optim.steps_per_epoch
    return c
