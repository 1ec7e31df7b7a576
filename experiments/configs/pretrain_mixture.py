"""3D-LLM training on the held-in task mixture (captioning, QA, dialogue, task decomposition,
grounding...): the 3D-LLM release data with ScanQA, SQA3D and ScanRefer, on BLIP-2 FlanT5-XL.

    python experiments/train.py --config experiments/configs/pretrain_mixture.py --workdir RUN \
        --config.model.pretrained=/path/to/blip2-flan-t5-xl --config.data_dir=TFDS_DIR \
        --config.data.annotations_dir=/path/to/annotations

Held-out scenes (on by default): every train record whose scene appears in the ScanQA / SQA3D
validation and test annotation files (`data.held_out_annotations`, names inside
`data.annotations_dir`) is left out of every dataset of the mixture, so the rooms the fine-tuned
model is evaluated on are never seen in pretraining. The scene list is read from those files at
start-up (llm3d_jax.data.holdout); a missing file is an error. `--config.data.hold_out_eval_scenes=False`
pretrains on every scene.
"""

from experiments.configs import scanqa_flant5xl
from llm3d_jax.data.holdout import EVAL_ANNOTATIONS


def get_config():
    c = scanqa_flant5xl.get_config()
    # name:weight over the llm3d_language/<name> TFDS configs; the release data dominates.
    c.data.datasets = "3dllm:4,scanqa:1,sqa3d:1,scanrefer:1"
    c.data.answer_len = 64  # dialogue and task-decomposition answers are longer than ScanQA's
    c.data.hold_out_eval_scenes = True
    c.data.annotations_dir = ""  # the folder holding the files below
    c.data.held_out_annotations = ",".join(EVAL_ANNOTATIONS)  # comma list
    c.total_steps = 100_000
    c.batch_size = 128
    c.optim.lr = 1e-4  # the released pretraining configs: 1e-4 decaying to 1e-5
    c.optim.min_lr = 1e-5
    c.optim.warmup_steps = 2000
    c.eval_every = 5000
    c.checkpoint_every = 2000
    return c
