"""Demo: the tiny 3D-LLM (`LLM3DConfig.demo`) on a laptop CPU in a few minutes.

`make demo` fine-tunes the pretrained model for `total_steps`:
    python experiments/train.py --config experiments/configs/demo.py --workdir RUN \
        --config.data_dir=demo_out/tfds --config.model.pretrained=assets/demo/pretrained_3d
tools/pretrain_demo.py trains it from random init with the same config (model.pretrained "",
config.tokenizer set, --config.total_steps 12000, then 8000 on the attribute questions, then
3000 with the grounding settings below set: assets/demo has them).
"""

import ml_collections
from ml_collections import config_dict


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Fine-tuning from assets/demo: 1000 steps, 8k examples, ~2 passes over the demo's training
    # records. 2000 steps took make demo to 17 minutes on 2 cores; with the box rule of the time,
    # held-out grounding Acc@0.25 was 26.6 at 600 steps, 28.5 at 2000 (QA EM 58.5, 60.7).
    # From scratch, 4000 steps gave held-out QA EM 52.7 (3D) vs 54.0 (blind).
    c.total_steps = 1000
    c.batch_size = 8
    c.microbatches = 1  # gradient accumulation: batch_size / microbatches rows per pass
    c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1: all remaining devices

    c.data_source = "tfds"  # "tfds" (data_dir from python -m data_pipeline.tfds) or "synthetic"
    c.data_dir = "demo_out/tfds"
    c.tokenizer = "demo_out/tokenizer"  # HF tokenizer directory for the random-init model
    c.data = ml_collections.ConfigDict(
        dict(
            datasets="synthetic",
            num_points=256,  # sampled per step from the 1024 stored: half the step time
            prompt_len=40,  # the longest question of the offline generator ("side"): 38
            answer_len=24,
            # The stored precision: no conversion on the host, and the model's first op casts
            # to float32, so the numbers are those of float32 features.
            features_dtype="float16",
            blind=False,  # True: zero features and voxels (the no-3D baseline of make demo)
            # The rooms live on the devices and the train step samples their points: the host
            # only tokenises, and keeps well ahead of the step (docs/benchmarks.md).
            scene_cache="device",
            scene_cache_budget_gb=1.0,  # a device's share above this: kept in host RAM
            worker_count=0,  # grain worker processes for the host's work (0: threads only)
        )
    )

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # a BLIP-2 / exported model directory; "" = random init of `preset`
    c.model.base = ""  # with a LAVIS .pth as `pretrained`: its BLIP-2 directory
    c.model.dropout = ml_collections.config_dict.placeholder(float)  # None: the model's rates
    c.model.preset = "demo"  # an LLM3DConfig constructor
    c.model.dtype = "float32"  # compute dtype; params stay float32
    c.model.remat = False
    # Grounding settings (LLM3DConfig.point_tokens, loc_table_dim, target_tokens, target_layers,
    # target_context). Unset: as the pretrained model has them (assets/demo: 32 target tokens,
    # the points rated as the named object's, and their box; location rows from a 21-wide
    # sin/cos table), or as the preset (none) at random init. Set, a model without them grows
    # them (docs/architecture.md, "Location tokens in the model"); 0 turns one off.
    c.model.point_tokens = config_dict.placeholder(int)
    c.model.loc_table_dim = config_dict.placeholder(int)
    c.model.target_tokens = config_dict.placeholder(int)
    c.model.target_layers = config_dict.placeholder(int)
    c.model.target_context = config_dict.placeholder(bool)
    # Roles of the named objects and their boxes' geometry as tokens (LLM3DConfig.object_roles;
    # assets/demo: 3): what relational questions are answered from.
    c.model.object_roles = config_dict.placeholder(int)
    # The rating above which a point joins the box the LLM is shown (LLM3DConfig, default -1).
    c.model.target_threshold = config_dict.placeholder(float)
    # Regexes over the pretrained model's param paths that start afresh (random init) instead:
    # tools/pretrain_demo.py's phase (d) re-initialises the role geometry ("role_geometry/.*").
    c.model.reinit = ()
    # Regexes over parameter paths; () = the model's default table (Q-Former, queries,
    # projection, location rows). A random-init LLM has nothing to keep frozen: all trains.
    c.trainable = (".*",)

    # Weight of the per-point rating loss of a model with target_tokens (train/step.py).
    c.rating_loss_weight = 1.0
    # Share of training rows whose role geometry tokens come from the true boxes of the named
    # objects, not the rated ones (a model with object_roles; train/step.py).
    c.role_teacher = 0.0

    c.optim = ml_collections.ConfigDict(
        dict(
            # From scratch at batch 8, 1e-3 is too high for this T5 (no 1/sqrt(d) in its
            # attention): held-out QA EM 49.5 / 49.7 (3D / blind) at 1e-3 with 1024 points and
            # 2000 steps, 52.7 / 54.0 at 2e-4 with 256 points and 4000 steps (fresh clone).
            lr=2e-4,
            min_lr=2e-5,
            warmup_steps=20,
            b1=0.9,
            b2=0.999,
            weight_decay=0.05,
            grad_clip=1.0,
        )
    )

    c.log_every = 10
    c.eval_every = 500  # 0: no validation
    c.eval_steps = 2
    c.eval_batch_size = 8
    c.eval_generate_batches = 4  # greedy answers on this many validation batches: val_em
    c.checkpoint_every = 500  # 0: the final step only
    c.keep_checkpoints = 2
    return c
