"""ScanQA fine-tuning of 3D-LLM with a decoder-only LLM (Llama 3 / Qwen2 / Mistral / OPT).

    python experiments/train.py --config experiments/configs/scanqa_llama.py --workdir RUN \
        --config.model.pretrained=/path/to/blip2-opt-2.7b \
        --config.model.llm_pretrained=/path/to/Llama-3.2-3B --config.data_dir=TFDS_DIR

`model.pretrained`: a HF BLIP-2 directory giving the Q-Former and its query tokens (its OPT
language model too when `model.llm_pretrained` is empty: the paper's BLIP-2 OPT-2.7B backbone).
`model.llm_pretrained`: a HF OPT / Llama / Qwen2 / Mistral causal-LM directory (sharded
safetensors with an index file are fine); its tokenizer gains the location tokens. The
projection Linear(768 -> LLM width) then starts from random, so it trains with the Q-Former.

Input to the LLM: [32 projected queries; prompt; answer], loss on the answer tokens only;
`model.prefix_causal = False` lets the queries and the prompt attend to each other in both
directions (a prefix LM), True keeps the LLM's own causal mask (as BLIP-2 OPT does).

Optimiser and schedule as scanqa_flant5xl.py (the paper's). LLM frozen in bf16 compute with
float32 weights, layers under nn.scan with remat; Q-Former, queries, projection and the
location-token rows train.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 20_000
    c.batch_size = 64
    c.microbatches = 2
    # FSDP: a 3B LLM's frozen weights and the activations split over the devices.
    c.mesh = (1, -1, 1)

    c.data_source = "tfds"
    c.data_dir = ""
    c.tokenizer = ""  # unused with pretrained directories (the LLM's tokenizer is used)
    c.data = ml_collections.ConfigDict(
        dict(
            datasets="scanqa",
            num_points=5000,
            prompt_len=64,
            answer_len=40,
            features_dtype="bfloat16",
            # "device": the train split's scenes uploaded once, the step samples and gathers
            # the points, the host sends under 1 KB per example instead of 14 MB (docs/training.md,
            # "The input path"); above the budget (GiB per device) they stay in host RAM.
            scene_cache="host",
            scene_cache_budget_gb=4.0,
            worker_count=0,  # grain worker processes for the host's per-example work
        )
    )

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # HF BLIP-2 directory (Q-Former, queries; OPT when no llm_pretrained)
    c.model.llm_pretrained = ""  # HF OPT / Llama / Qwen2 / Mistral directory
    c.model.preset = "llama3_3b"  # shapes only: what the step compiles to without weights
    c.model.prefix_causal = False
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True
    c.trainable = ()  # the model's default table

    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-5,
            min_lr=0.0,
            warmup_steps=1000,
            b1=0.9,
            b2=0.999,
            weight_decay=0.05,
            grad_clip=1.0,
        )
    )

    c.log_every = 50
    c.eval_every = 1000
    c.eval_steps = 20
    c.eval_batch_size = 64
    c.eval_generate_batches = 0  # > 0: also greedy answers to that many batches (val_em, val_acc25)
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    return c
