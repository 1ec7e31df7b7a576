r"""Input pipeline: what it delivers against what the train step consumes, in one process.

    python tools/bench/input_pipeline.py [--seconds 3] [--threads 2] [--doc docs/benchmarks.md]

Runs on 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here
when XLA_FLAGS is unset), every batch a global jax.Array on an (8,1,1) mesh. Two data sets of
generated scenes, built into TFDS and read through the real pipeline (llm3d_jax.data):
  demo   the demo config's shapes: 32 rooms of 1024 points, D = the tiny model's width; 256
         points sampled per example, prompt 32, answer 24, batch 8
  paper  the released model's: 12 scenes of 6000 points, D=1408 in bfloat16 (the pod configs'
         features_dtype); 5000 points sampled per example, prompt 64, answer 40, batch 8
For each, model-ready examples/s delivered by
  - the host path: each example reads its scene record, the host gathers its points (threads),
  - the host path with 2 grain worker processes (`data.worker_count`),
  - the device scene cache (`data.scene_cache = "device"`): the host sends the text, scene
    index and sampling key ("host side"), and the same followed by the gather the train step
    runs first ("+ the step's gather": `scene_cache.model_batch`, jitted),
  - at 5000 x 1408, also the host path with float16 features (the stored precision, no cast),
and the bytes handed host -> device per example (`BatchIterator.sent_bytes`; the cache's one-time
upload is printed apart), against references measured in the same process on the same devices:
the examples/s that two train steps at the demo shapes consume, the tiny 3D-LLM's
(tools/bench/train_step.py's, what `python -m tools.bench` calls the demo step) and the demo
model's (the step `make demo` runs: experiments/configs/demo.py fine-tuning
assets/demo/pretrained_3d). Each pipeline is measured on a fresh iterator (closed after, so no
other pipeline's threads or processes run meanwhile); the measurements alternate over 3 rounds
and each keeps its best (the machine is shared). `--doc` writes the figures as the "Input
pipeline" section of a Markdown file (`python -m tools.bench` keeps that section when it
rewrites docs/benchmarks.md).

`make_inputs` and `naive_rate` are also used by `python -m tools.bench`'s pipeline figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if "jax" not in sys.modules and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import numpy as np

from data_pipeline.tfds import build
from llm3d_jax import data, tokens
from llm3d_jax.data import preprocess, scene_cache
from llm3d_jax.fileio import load_npz, save_npz_atomic, write_jsonl_atomic, write_text_atomic

SECTION = "## Input pipeline (tools/bench/input_pipeline.py)"
COMMAND = "python tools/bench/input_pipeline.py"


def make_inputs(root: str, num_scenes: int, points: int, dim: int, per_scene: int, seed: int = 0):
    """Random scene feature files (docs/architecture.md) and qa/grounding records on them."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(num_scenes):
        scene_id = f"scene{s:04d}_00"
        xyz = rng.uniform(0, [6, 5, 3], (points, 3)).astype(np.float32)
        origin = xyz.min(0)
        voxel = np.float32((xyz.max(0) - origin).max() / 256 * 1.0001)
        feats = rng.normal(size=(points, dim)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        boxes = np.array([[1, 1, 0, 2, 2, 1], [3, 2, 0, 4, 3, 2]], np.float32)
        save_npz_atomic(
            os.path.join(root, "features", scene_id + ".npz"),
            points=xyz,
            features=feats.astype(np.float16),
            voxels=np.floor((xyz - origin) / voxel).astype(np.uint8),
            grid_origin=origin,
            grid_voxel=voxel,
            instance=rng.integers(-1, 2, points).astype(np.int32),
            object_ids=np.arange(2, dtype=np.int32),
            object_labels=np.array(["chair", "table"]),
            object_boxes=boxes,
            meta=np.array(json.dumps({"scene_id": scene_id})),
        )
        for k in range(per_scene):
            box = "<box>" + " ".join(f"{v:.2f}" for v in boxes[k % 2]) + "</box>"
            qa = k % 2 == 0
            rows.append(
                {
                    "id": f"{scene_id}-{k}",
                    "scene_id": scene_id,
                    "task": "qa" if qa else "grounding",
                    # A text of its own per record, as in real data (no tokenisation reuse).
                    "prompt": f"what is near window {k} of room {s}?"
                    if qa
                    else f"the brown chair {k} of room {s}",
                    "answers": [f"a brown wooden chair next to table {k} of room {s}"]
                    if qa
                    else [box],
                    "object_ids": [k % 2],
                    "source": "template",
                    "meta": {},
                }
            )
    write_jsonl_atomic(os.path.join(root, "records.jsonl"), rows)
    return os.path.join(root, "features"), os.path.join(root, "records.jsonl"), rows


def naive_rate(features_dir, rows, fn: preprocess.Preprocess, examples: int) -> float:
    """Reference: per example, np.load the scene's npz and run the same preprocessing."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(examples):
        r = rows[i % len(rows)]
        raw = load_npz(os.path.join(features_dir, r["scene_id"] + ".npz"))
        scene = {**raw, "grid_voxel": np.float32(raw["grid_voxel"])}
        record = {**r, "object_ids": np.asarray(r["object_ids"], np.int32)}
        fn.collate([fn(("synthetic", (record, scene), True), rng)])
    return examples / (time.perf_counter() - start)


PIPELINES = {  # name -> (make_train_iterator options, gather inside jit)
    "host path": (dict(), False),
    "host path, 2 worker processes": (dict(worker_count=2), False),
    "device scene cache: host side": (dict(scene_cache="device"), False),
    "device scene cache: + the step's gather": (dict(scene_cache="device"), True),
}


# The stored precision: no cast on the host (at 5000 x 1408 the bfloat16 cast is the largest
# host cost after reading the record).
FLOAT16 = {"host path, float16 features": (dict(features_dtype="float16"), False)}


def delivery(it, mesh, gather: bool):
    """-> a function returning the next batch, blocked on; with `gather`, the cached-layout
    batch gathered by the jitted `scene_cache.model_batch` (what the train step does first)."""
    cache = it.scene_cache
    if not gather:
        return lambda: jax.block_until_ready(next(it))
    fn = jax.jit(lambda arrays, batch: scene_cache.model_batch(arrays, batch, cache.spec))

    def next_batch():
        with jax.set_mesh(mesh):
            return jax.block_until_ready(fn(cache.arrays, next(it)))

    return next_batch


def rate(make_iterator, mesh, gather: bool, seconds: float) -> tuple[float, float, object]:
    """-> (examples/s over at least `seconds` of a fresh iterator after 2 warm-up batches, bytes
    handed host -> device per example, its scene cache): fresh and closed after, so no other
    pipeline's threads or processes run meanwhile; a window of seconds, so the few batches
    prepared ahead of the first timed one do not count."""
    it = make_iterator()
    next_batch = delivery(it, mesh, gather)
    for _ in range(2):
        next_batch()
    sent, batches = it.sent_bytes, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or batches < 3:
        next_batch()
        batches += 1
    elapsed = time.perf_counter() - start
    per_example = (it.sent_bytes - sent) / (8 * batches)
    it.close()
    return 8 * batches / elapsed, per_example, it.scene_cache


def collective_seconds(mesh, shape, dtype) -> tuple[float, float]:
    """-> (seconds of a bare all_to_all over the batch axes of a [B,P,D] array split on D, as
    the gather's; seconds of an elementwise add over the same bytes): best of 5 each."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    axes = ("data", "fsdp")
    x = jax.device_put(np.zeros(shape, dtype), NamedSharding(mesh, P(None, None, axes)))
    all_to_all = jax.jit(
        jax.shard_map(
            lambda x: jax.lax.all_to_all(x, axes, 0, 2, tiled=True),
            mesh=mesh,
            in_specs=P(None, None, axes),
            out_specs=P(axes),
        )
    )
    add = jax.jit(lambda x: x + 1)
    best = []
    for fn in (all_to_all, add):
        jax.block_until_ready(fn(x))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(fn(x))
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return best[0], best[1]


DEMO_MODEL = "assets/demo/pretrained_3d"  # what make demo fine-tunes


def timed_steps(compiled, state, frozen, batch, mesh):
    """-> consume(seconds): examples/s of a compiled train step called for at least `seconds`
    (after 2 warm-up calls) on one fixed batch."""
    carry = {"state": state}
    size = len(batch["answer_ids"])

    def step():
        carry["state"], m = compiled(carry["state"], frozen, batch, jax.random.key(1))
        return jax.block_until_ready(m)

    def consume(seconds: float) -> float:
        with jax.set_mesh(mesh):
            for _ in range(2):
                step()
            steps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds or steps < 3:
                step()
                steps += 1
        return size * steps / (time.perf_counter() - start)

    return consume


def tiny_step(mesh, shapes: tuple[int, int, int]):
    """-> (consume, the model's D): tools/bench/train_step.py's step (the tiny 3D-LLM, float32,
    `llm3d.TRAINABLE`; what `python -m tools.bench` calls the demo step) on a random batch."""
    from llm3d_jax.train import sharding, synthetic
    from llm3d_jax.train import state as state_lib
    from tools.bench import train_step as train_step_bench

    _, cfg, *_ = train_step_bench.demo_model()
    built = train_step_bench.build_step(cfg, mesh, 8, 1, "float32", False, shapes)
    cfg = built["cfg"]
    source = synthetic.SyntheticBatches(
        batch_size=8,
        num_points=shapes[0],
        feature_dim=cfg.feature_dim,
        prompt_len=shapes[1],
        answer_len=shapes[2],
        vocab_size=cfg.llm.loc_offset,
        answer_offset=cfg.llm.loc_offset,
        seed=0,
        sharding=sharding.batch_sharding(mesh),
    )
    with jax.set_mesh(mesh):
        init = (built["init_fn"], built["tx"], built["patterns"])
        state, frozen = state_lib.init_random(
            *init, built["state_sh"], built["frozen_sh"], jax.random.key(0)
        )
    return timed_steps(built["compiled"], state, frozen, next(source), mesh), cfg.feature_dim


def demo_model_step(mesh):
    """-> consume: the step `make demo` runs (experiments/configs/demo.py fine-tuning
    DEMO_MODEL: the demo preset with its target tokens, every parameter trained) on a random
    batch of the demo shapes with per-point targets."""
    from experiments.configs import demo
    from llm3d_jax.train import setup
    from llm3d_jax.train import state as state_lib

    config = demo.get_config()
    config.model.pretrained = DEMO_MODEL
    module, params = setup.build_model(config)
    training = setup.build_training(config, mesh, module)
    batch_abs = setup.abstract_batch(config, module.config, mesh)
    with jax.set_mesh(mesh):
        state, frozen = state_lib.init_from_params(
            params, training.tx, training.patterns, training.state_sh, training.frozen_sh
        )
    compiled = setup.compile_train_step(config, mesh, training, batch_abs, frozen)
    rng = np.random.default_rng(0)
    vocab = module.config.llm.loc_offset
    batch = {}
    for k, a in batch_abs.items():
        if a.dtype == bool:
            value = rng.random(a.shape) < 0.9
        elif np.issubdtype(a.dtype, np.integer):
            value = rng.integers(0, 256 if k == "voxels" else vocab, a.shape)
        else:
            value = rng.normal(size=a.shape)
        batch[k] = jax.device_put(value.astype(a.dtype), a.sharding)
    return timed_steps(compiled, state, frozen, batch, mesh)


def measure(
    name, root, tok_dir, mesh, consume, *, scenes, points, dim, shapes, dtype, args, more=None
):
    """-> dict of the figures of one data set (module doc); `more`: pipelines besides
    PIPELINES."""
    pipelines = {**PIPELINES, **(more or {})}
    features_dir, records, _ = make_inputs(root, scenes, points, dim, per_scene=8)
    out = os.path.join(root, "tfds")
    build(features_dir, records, out, "synthetic", val_fraction=0.0)
    opts = dict(batch_size=8, read_threads=args.threads, features_dtype=dtype, seed=0, **shapes)
    rates, sent = dict.fromkeys(pipelines, 0.0), {}
    steps, cache = {}, None
    for _ in range(3):  # alternate, keep each one's best: the machine is shared
        for k, (extra, gather) in pipelines.items():
            make = lambda extra=extra: data.make_train_iterator(
                out, tok_dir, mesh, **{**opts, **extra}
            )
            r, sent[k], it_cache = rate(make, mesh, gather, args.seconds)
            rates[k] = max(rates[k], r)
            cache = it_cache or cache
        for k, fn in consume.items():
            steps[k] = max(steps.get(k, 0.0), fn(args.seconds))
    n = shapes["num_points"]
    features = (8, n, cache.arrays["features"].shape[1])  # a batch's, columns padded
    a2a, add = collective_seconds(mesh, features, cache.arrays["features"].dtype)
    return {
        "a2a": (np.prod(features) * cache.arrays["features"].dtype.itemsize, a2a, add),
        "name": name,
        "where": f"{scenes} scenes of {points} points, D={dim} {dtype}; {n} sampled per "
        f"example, prompt {shapes['prompt_len']}, answer {shapes['answer_len']}, batch 8",
        "rates": rates,
        "sent": sent,
        "steps": steps,
        "upload": sum(v.nbytes for v in cache.arrays.values()),
        "per_device": cache.per_device_bytes,
    }


TINY, DEMO = "tiny 3D-LLM step", "demo model step"


def report(results: list[dict], devices: str, load: float) -> list[str]:
    """The figures as Markdown lines (also printed)."""
    lines = [
        SECTION,
        "",
        f"Written by `{COMMAND} --doc docs/benchmarks.md` (one process, {devices}, mesh (8,1,1), global "
        f"jax.Arrays; load average {load:.1f} at the start). References, measured in the same "
        "run on the same 8 devices at the demo shapes (batch 8, 256 points, prompt 32, answer "
        f"24): the examples/s consumed by the {TINY} (tools/bench/train_step.py's, what "
        "`python -m tools.bench` calls the demo step) and by the "
        f"{DEMO} (the step `make demo` runs: experiments/configs/demo.py fine-tuning "
        f"{DEMO_MODEL}, target tokens on). Delivered = batches on the devices, blocked on; for "
        'the cache, "host side" is what the input pipeline delivers (the batch naming the '
        'points) and "+ the step\'s gather" adds the jitted `scene_cache.model_batch` the train '
        "step runs first.",
        "",
        f"| data | pipeline | examples/s | / {TINY} | / {DEMO} | bytes host->device per "
        "example | vs host path |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        host, tiny, demo = r["sent"]["host path"], r["steps"][TINY], r["steps"][DEMO]
        for k, v in r["rates"].items():
            sent = r["sent"][k]
            lines.append(
                f"| {r['name']} | {k} | {v:,.1f} | {v / tiny:.2f}x | {v / demo:.2f}x | "
                f"{sent:,.0f} | {100 * sent / host:.3g}% |"
            )
        for k, v in r["steps"].items():
            lines.append(f"| {r['name']} | {k} consumes (reference) | {v:,.1f} | | | | |")
    lines.append("")
    for r in results:
        lines.append(
            f"- {r['name']}: {r['where']}. The cache's one-time upload: {r['upload'] / 2**20:,.1f}"
            f" MiB ({r['per_device'] / 2**20:,.1f} MiB per device, the feature columns split 8 "
            "ways)."
        )
    size, a2a, add = results[-1]["a2a"]
    lines += [
        "- The gather's all_to_all moves the batch's features between devices once per step "
        "(B x P x D x 2 bytes over the mesh). Here the 8 devices are simulated on the CPU, where "
        f"a bare all_to_all of one {results[-1]['name']} batch's features ({size / 2**20:.0f} "
        f"MiB) took {a2a * 1e3:.0f} ms, {a2a / add:.0f}x an elementwise add over the same bytes "
        "(same run): that row is XLA:CPU's collectives, not an accelerator figure; on a pod the "
        "same bytes cross the chips' interconnect instead of the host link.",
        "- Shared 2-core machine: the simulated devices, the reader threads and the worker "
        "processes all share the same cores, so absolute rates are noisy and a worker process "
        "competes with the main one; read the ratios within one data set.",
        "",
    ]
    return lines


def with_section(text: str, lines: list[str]) -> str:
    """`text` (a Markdown file) with its SECTION replaced by `lines` (appended if absent)."""
    return kept_before(text).rstrip("\n") + "\n\n" + "\n".join(lines)


def kept_before(text: str) -> str:
    """`text` up to SECTION (all of it when it has none)."""
    return text.split("\n" + SECTION + "\n")[0] if SECTION in text else text


def section_of(text: str) -> str:
    """SECTION and what follows it in `text` ("" when absent): what `python -m tools.bench`
    carries over when it rewrites the file."""
    return text[text.index(SECTION) :] if SECTION in text else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="grain read threads")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed window per figure")
    parser.add_argument("--doc", default="", help="Markdown file to write the section into")
    args = parser.parse_args()
    from llm3d_jax.train import sharding

    mesh = sharding.make_mesh((-1, 1, 1))
    if sharding.data_parallel_size(mesh) != 8:
        raise SystemExit(f"needs 8 devices, has {jax.device_count()}: set XLA_FLAGS (module doc)")
    load = os.getloadavg()[0]
    devices = f"{jax.device_count()} x {jax.devices()[0].platform} devices"
    print(f"jax {jax.__version__}, {devices}; load average {load:.1f}")
    demo = dict(num_points=256, prompt_len=32, answer_len=24)
    tiny, demo_dim = tiny_step(mesh, tuple(demo.values()))
    consume = {TINY: tiny, DEMO: demo_model_step(mesh)}
    results = []
    with tempfile.TemporaryDirectory() as root:
        texts = ["what is near window 7 of room 12?", "a brown wooden chair next to table 3"]
        tok_dir = os.path.join(root, "tok")
        tokens.train_tokenizer(texts * 10, 300, tok_dir)
        common = dict(mesh=mesh, consume=consume, args=args)
        results.append(
            measure(
                "demo", os.path.join(root, "demo"), tok_dir, scenes=32, points=1024,
                dim=demo_dim, shapes=demo, dtype="float16", **common,
            )
        )  # fmt: skip
        results.append(
            measure(
                "5000 x 1408", os.path.join(root, "paper"), tok_dir, scenes=12, points=6000,
                dim=1408, shapes=dict(num_points=5000, prompt_len=64, answer_len=40),
                dtype="bfloat16", more=FLOAT16, **common,
            )
        )  # fmt: skip
    lines = report(results, devices, load)
    print("\n".join(lines))
    if args.doc:
        text = open(args.doc, encoding="utf-8").read() if os.path.exists(args.doc) else ""
        write_text_atomic(args.doc, with_section(text, lines))
        print(f"wrote the section into {args.doc}")


if __name__ == "__main__":
    main()
