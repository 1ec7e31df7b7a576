r"""`make bench`: the project's headline figures as ONE table of ratios, each measured side by side
with its reference in this process.

    python -m tools.bench [--repeats 5] [--only train,decode] [--out bench_out] [--doc docs/benchmarks.md]

Prints the table (figure, ours, reference, ratio = ours / reference, units, notes) and writes it
with the machine it ran on to `--doc` (markdown) and `--out`/bench.json. Figures:
  lifting   fusion vs a naive dense implementation (tools/bench/lifting.py, when present)
  pipeline  grain input pipeline examples/s (the demo config's device scene cache, and the host
            path) vs what the demo train step consumes, and the host path vs a naive npz loader
            (tools/bench/input_pipeline.py's inputs and naive loader; that script's own section
            of --doc, the 5000 x 1408 figures, is kept when the file is rewritten)
  train     the demo train step (tools/bench/train_step.py's jitted step): model FLOP/s vs the
            measured peak of a jitted float32 2048^3 matmul (= MFU), and steps/s vs the same
            step in PyTorch (transformers Blip2QFormerModel + T5ForConditionalGeneration,
            tools/bench/torch_reference.py)
  train_large  MFU of train_step.py's ~100M compute-bound config
  decode    greedy generation tokens/s with the KV cache vs a no-cache loop, and vs PyTorch
            `generate` at the same shapes
  render    headless rendering frames/s vs a naive per-pixel ray loop and vs bare open3d casts
  language  offline language records/s vs serialising the same records as JSON
The PyTorch rows need `import torch` to work (e.g. a venv with torch and this project); without
it they say "torch not installed". Timing: a warm-up call (compilation) excluded, then
`--repeats` timed calls, median (TIMING_NOTE).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import jax  # before tools.bench.train_step, which would otherwise ask for 8 simulated devices
import jax.numpy as jnp
import jaxlib
import numpy as np
from tqdm import tqdm

from llm3d_jax.fileio import cli_main, write_text_atomic

TORCH_MISSING = "torch not installed"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMING_NOTE = (
    "Timing: a warm-up call (where JAX compiles) excluded, then N timed calls, median; numpy-only "
    "figures have no warm-up, lifting takes at most 2 calls and the ~100M train step at most 3. "
    "The reference of each row is measured in the same process right next to ours, so the ratio "
    "is what to read; absolute numbers move with the machine's load."
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: `figure` reads "<what>: <ours> vs <reference>"."""

    figure: str
    ours: float | None
    reference: float | None
    units: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference


@dataclasses.dataclass(frozen=True)
class Settings:
    repeats: int
    torch_ref: object | None  # the tools.bench.torch_reference module, None without torch
    torch_versions: str = TORCH_MISSING  # its versions, or why there is none


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed calls; `fn` must
    block until its work is done (jax.block_until_ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_batch(cfg, batch: int, points: int, prompt_len: int, answer_len: int) -> dict:
    """Host arrays with the model's input keys, every mask full (the most work a batch of these
    shapes can ask for): the same batch feeds ours and the PyTorch reference."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(batch, points, cfg.feature_dim)).astype(np.float32)
    return {
        "features": features / np.linalg.norm(features, axis=-1, keepdims=True),
        "voxels": rng.integers(0, 256, (batch, points, 3)).astype(np.int32),
        "point_mask": np.ones((batch, points), bool),
        "prompt_ids": rng.integers(
            2, cfg.llm.loc_offset or cfg.llm.vocab_size, (batch, prompt_len)
        ).astype(np.int32),
        "prompt_mask": np.ones((batch, prompt_len), bool),
        "answer_ids": rng.integers(2, cfg.llm.num_logits, (batch, answer_len)).astype(np.int32),
        "answer_mask": np.ones((batch, answer_len), bool),
    }


# ---------------------------------------------------------------------------------------------
# train step (shared by the pipeline figure: what training consumes)


@functools.cache
def train_step_run(model: str, repeats: int) -> dict:
    """Median seconds of the real jitted train step (tools/bench/train_step.py's `build_step`:
    AdamW over `llm3d.TRAINABLE`, float32) on a random batch, and the FLOP/s of a jitted
    float32 2048^3 matmul measured around it (`llm3d_jax.train.metrics`).
    model: "demo" | "compute"."""
    from llm3d_jax.train import metrics, sharding
    from llm3d_jax.train import state as state_lib
    from tools.bench import train_step

    if model == "demo":
        name, cfg, batch_size, *shapes = train_step.demo_model()
    else:
        name, cfg, batch_size, *shapes = train_step.compute_bound_model()
    mesh = sharding.make_mesh((-1, 1, 1))
    built = train_step.build_step(cfg, mesh, batch_size, 1, "float32", False, tuple(shapes))
    num_points, prompt_len, answer_len = shapes
    host = random_batch(built["cfg"], batch_size, num_points, prompt_len, answer_len)
    batch = jax.device_put(host, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        state, frozen = state_lib.init_random(
            built["init_fn"],
            built["tx"],
            built["patterns"],
            built["state_sh"],
            built["frozen_sh"],
            jax.random.key(0),
        )
        carry, rng = {"state": state}, jax.random.key(1)

        def step():
            carry["state"], m = built["compiled"](carry["state"], frozen, batch, rng)
            jax.block_until_ready(m)

        peak_before = metrics.measure_cpu_peak_flops(2048, repeats=10)
        seconds = median_seconds(step, repeats, warmup=1)  # compiled ahead of time
        # A peak is the best the machine gives: best of 10 matmuls before and 10 after the steps,
        # so that a busy spell of the shared machine cannot make it look small.
        peak = max(peak_before, metrics.measure_cpu_peak_flops(2048, repeats=10))
    return dict(
        name=name,
        cfg=built["cfg"],
        batch_size=batch_size,
        shapes=tuple(shapes),
        seconds=seconds,
        peak=peak,
        flops=batch_size * metrics.llm3d_flops(built["cfg"].qformer, built["cfg"].llm, *shapes),
        host_batch=host,
    )


def train_rows(model: str, s: Settings, compare_torch: bool = True) -> list[Row]:
    """MFU against the measured matmul peak, and steps/s against the PyTorch step."""
    # The ~100M step takes seconds on 2 cores: at most 3 timed steps.
    run = train_step_run(model, s.repeats if model == "demo" else min(s.repeats, 3))
    peak = run["peak"]
    b, (n, lp, la) = run["batch_size"], run["shapes"]
    tokens_per_s = b * (lp + la) / run["seconds"]
    label = f"train step {run['name']}, B={b} N={n} Lp={lp} La={la}"
    rows = [
        Row(
            f"{label}: model FLOP/s vs f32 2048^3 matmul (= MFU)",
            run["flops"] / run["seconds"] / 1e9,
            peak / 1e9,
            "GFLOP/s",
            f"{tokens_per_s:,.0f} tokens/s, {run['seconds'] * 1e3:.1f} ms/step, "
            f"MFU {run['flops'] / run['seconds'] / peak:.2%}",
        )
    ]
    if not compare_torch:
        return rows
    figure = f"{label}: ours vs PyTorch (same shapes, AdamW, same trainable set)"
    if s.torch_ref is None:
        return rows + [Row(figure, 1 / run["seconds"], None, "steps/s", s.torch_versions)]
    torch_s, threads = s.torch_ref.train_step_seconds(run["cfg"], run["host_batch"], s.repeats)
    note = f"tokens/s ours {tokens_per_s:,.0f}, PyTorch {b * (lp + la) / torch_s:,.0f} ({threads} thread(s))"
    return rows + [Row(figure, 1 / run["seconds"], 1 / torch_s, "steps/s", note)]


# ---------------------------------------------------------------------------------------------
# input pipeline


def fig_pipeline(s: Settings) -> list[Row]:
    """The grain pipeline over TFDS (32 random rooms of 1024 points, qa/grounding records) at
    the demo shapes, batches of global jax.Arrays: the demo config's (the device scene cache;
    its batch gathered by the jitted `scene_cache.model_batch`, what the step runs first) and
    the host path's, against the demo train step's appetite, and the host path against
    tools/bench/input_pipeline.py's naive loader."""
    from data_pipeline.tfds import build
    from llm3d_jax import data, tokens
    from llm3d_jax.data import scene_cache
    from llm3d_jax.train import sharding
    from tools.bench import input_pipeline

    run = train_step_run("demo", s.repeats)
    batch_size, (num_points, prompt_len, answer_len) = run["batch_size"], run["shapes"]
    shapes = dict(num_points=num_points, prompt_len=prompt_len, answer_len=answer_len)
    batches = 10
    with tempfile.TemporaryDirectory() as root:
        features_dir, records, rows = input_pipeline.make_inputs(
            root, num_scenes=32, points=1024, dim=run["cfg"].feature_dim, per_scene=8
        )
        out = os.path.join(root, "tfds")
        build(features_dir, records, out, "synthetic", val_fraction=0.0)
        tok_dir = os.path.join(root, "tok")
        tokens.train_tokenizer([r["prompt"] for r in rows] + [r["answers"][0] for r in rows], 300, tok_dir)  # fmt: skip
        mesh = sharding.make_mesh((-1, 1, 1))
        rates = {}
        for name, extra in (("cache", dict(scene_cache="device")), ("host", {})):
            # Held in a dict so that the iterator (and its reader threads) can be dropped
            # before the temporary folder goes away.
            live = {
                "it": data.make_train_iterator(
                    out, tok_dir, mesh, batch_size=batch_size, read_threads=2, **shapes, **extra
                )
            }
            cache = live["it"].scene_cache
            gather = None
            if cache is not None:
                gather = jax.jit(functools.partial(scene_cache.model_batch, spec=cache.spec))

            def pipeline_batches(cache=cache, gather=gather, live=live):
                with jax.set_mesh(mesh):
                    for _ in range(batches):
                        batch = next(live["it"])
                        if cache is not None:
                            batch = gather(cache.arrays, batch)
                        jax.block_until_ready(batch)

            rates[name] = batch_size * batches / median_seconds(pipeline_batches, s.repeats)
            live["it"].close()
            live.clear()
        fn, _ = data.pipeline.make_preprocess(
            out,
            ["synthetic"],
            tok_dir,
            loc_bins=run["cfg"].llm.loc_bins,
            prompt_templates=None,
            train=True,
            features_dtype="float16",
            **shapes,
        )
        naive_rate = statistics.median(
            input_pipeline.naive_rate(features_dir, rows, fn, batch_size * batches)
            for _ in range(max(s.repeats, 1))
        )
        gc.collect()
    consume_rate = batch_size / run["seconds"]
    where = f"demo shapes (B={batch_size}, N={num_points} of 1024, D={run['cfg'].feature_dim}), global jax.Arrays"
    return [
        Row(
            "input pipeline, demo config (device scene cache) vs demo train-step consumption",
            rates["cache"],
            consume_rate,
            "examples/s",
            f"{where}, gathered by the step's jitted gather; ratio > 1: the pipeline keeps up",
        ),
        Row(
            "input pipeline, host path vs demo train-step consumption",
            rates["host"],
            consume_rate,
            "examples/s",
            f"{where}; each example reads its scene record",
        ),
        Row(
            "input pipeline, host path vs naive per-example npz loader",
            rates["host"],
            naive_rate,
            "examples/s",
            "same preprocessing in both",
        ),
    ]


# ---------------------------------------------------------------------------------------------
# decoding


def fig_decode(s: Settings) -> list[Row]:
    """`llm3d_jax.infer.generate` (jitted prefill + KV-cached greedy loop) on the demo model
    against a no-cache loop and against PyTorch `generate`, random weights."""
    from llm3d_jax.infer.decode import DecodeConfig
    from llm3d_jax.infer.generate import generate, pad_to_buckets
    from llm3d_jax.model import llm3d
    from llm3d_jax.model.t5 import shift_right

    cfg = llm3d.LLM3DConfig.tiny()
    module = llm3d.LLM3D(cfg)
    params = llm3d.init_params(module)
    batch_size, num_points, prompt_len, length = demo_shapes()
    host = random_batch(cfg, batch_size, num_points, prompt_len, length)
    keys = ("features", "voxels", "point_mask", "prompt_ids", "prompt_mask")
    inputs, _ = pad_to_buckets({k: host[k] for k in keys}, pad_id=0)
    # eos_id -1 never matches: every row decodes the full length on both sides.
    config = DecodeConfig(strategy="greedy", max_new_tokens=length, eos_id=-1, pad_id=0)
    start_id = cfg.llm.decoder_start_token_id

    @jax.jit
    def greedy_no_cache(params, inputs):
        """Each step re-runs the decoder over the whole [B, length] answer buffer (the encoder
        output is computed once): what generation costs without the KV cache."""
        encoded, mask = module.apply({"params": params}, **inputs, method=llm3d.LLM3D.encode)
        answer_mask = jnp.ones((encoded.shape[0], length), bool)

        def body(t, ids):
            logits = module.apply(
                {"params": params},
                encoded,
                mask,
                shift_right(ids, start_id),
                answer_mask,
                method=lambda m, *a: m.llm.decode(*a),
            )
            return ids.at[:, t].set(jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32))

        return jax.lax.fori_loop(0, length, body, jnp.zeros((encoded.shape[0], length), jnp.int32))

    got = {}

    def cached():
        got["cached"] = generate(module, params, inputs, config)[0]

    def no_cache():
        got["no_cache"] = np.asarray(greedy_no_cache(params, inputs))

    cached_s = median_seconds(cached, s.repeats)
    no_cache_s = median_seconds(no_cache, s.repeats)
    agree = float(np.mean(got["cached"] == got["no_cache"]))
    tokens = batch_size * length
    shape = (
        f"B={batch_size}, N={num_points}, Lp={inputs['prompt_ids'].shape[1]}, {length} new tokens"
    )
    rows = [
        Row(
            "greedy decode, demo model: KV cache vs no cache",
            tokens / cached_s,
            tokens / no_cache_s,
            "tokens/s",
            f"{shape}; prefill included; same tokens {agree:.0%}",
        )
    ]
    figure = "greedy decode, demo model: ours (KV cache) vs PyTorch generate"
    if s.torch_ref is None:
        rows.append(Row(figure, tokens / cached_s, None, "tokens/s", s.torch_versions))
    else:
        torch_s, threads = s.torch_ref.generate_seconds(cfg, inputs, length, s.repeats)
        note = f"{shape}; random weights; PyTorch on {threads} thread(s)"
        rows.append(Row(figure, tokens / cached_s, tokens / torch_s, "tokens/s", note))
    return rows


def demo_shapes() -> tuple[int, int, int, int]:
    """(batch, num_points, prompt_len, answer_len) of the demo config."""
    from experiments.configs import demo

    c = demo.get_config()
    return c.batch_size, c.data.num_points, c.data.prompt_len, c.data.answer_len


# ---------------------------------------------------------------------------------------------
# rendering, language, lifting


def fig_render(s: Settings) -> list[Row]:
    """`data_pipeline.render.Raycaster.render` against tools/bench/render.py's naive per-pixel
    loop and bare open3d casts of the same rays."""
    import open3d as o3d

    from data_pipeline import render
    from data_pipeline.scenes import synthetic
    from tools.bench.render import naive_pixel_depth

    width, height, views = 320, 240, 8
    scene = synthetic.make_scene(0, 3)
    raycaster = render.Raycaster(scene)
    poses = render.room_cameras(raycaster, views, np.random.default_rng(0))
    K = render.pinhole_K(width, height, 80.0)
    ours_s = median_seconds(
        lambda: [raycaster.render(p, K, width, height) for p in poses], s.repeats
    )

    camera_rays = render.pixel_rays(K, width, height)
    rays = []
    for pose in poses:
        directions = np.einsum("ij,nj->ni", pose[:3, :3].astype(np.float64), camera_rays)
        origins = np.broadcast_to(pose[:3, 3], directions.shape)
        rays.append(np.concatenate([origins, directions], axis=1).astype(np.float32))
    raw_scene = o3d.t.geometry.RaycastingScene()
    raw_scene.add_triangles(
        o3d.core.Tensor(scene.vertices), o3d.core.Tensor(scene.faces.astype(np.uint32))
    )
    tensors = [o3d.core.Tensor(r) for r in rays]
    raw_s = median_seconds(lambda: [raw_scene.cast_rays(t) for t in tensors], s.repeats)

    # Naive: a per-pixel Python loop over all triangles, on a 16x12 crop of view 0, scaled up.
    crop = rays[0].reshape(height, width, 6)[114:126, 152:168].reshape(-1, 6).astype(np.float64)
    vertices = scene.vertices.astype(np.float64)
    depth = {}

    def naive():
        depth["naive"] = [naive_pixel_depth(vertices, scene.faces, r[:3], r[3:]) for r in crop]

    naive_s = median_seconds(naive, min(s.repeats, 3), warmup=0) * width * height / len(crop)
    ours_crop = raycaster.render(poses[0], K, width, height)["depth"][114:126, 152:168].ravel()
    diff = float(np.abs(np.asarray(depth["naive"]) - ours_crop).max())
    note = f"{len(scene.faces)} triangles, {views} views; rgb + depth + instance + normals"
    return [
        Row(
            f"render {width}x{height}: ours vs naive per-pixel loop",
            views / ours_s,
            1 / naive_s,
            "frames/s",
            f"{note}; naive from a {len(crop)}-pixel crop, max depth difference {diff:.1e} m",
        ),
        Row(
            f"render {width}x{height}: ours vs bare open3d cast_rays (ceiling)",
            views / ours_s,
            views / raw_s,
            "frames/s",
            "same rays; ratio < 1 is the cost of colours / ids / normals",
        ),
    ]


def fig_language(s: Settings) -> list[Row]:
    """The offline language generator (all tasks) against serialising its records as JSON."""
    from data_pipeline.language import offline
    from data_pipeline.scenes.synthetic import make_scene

    scenes = [make_scene(0, i) for i in range(12)]
    out = {}

    def generate():
        out["records"] = [r for scene in scenes for r in offline.generate(scene, 0)]

    generate_s = median_seconds(generate, s.repeats, warmup=0)
    records = out["records"]
    write_s = median_seconds(
        lambda: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), s.repeats
    )
    return [
        Row(
            "offline language records: generate vs JSON serialise the same records",
            len(records) / generate_s,
            len(records) / write_s,
            "records/s",
            f"{len(scenes)} synthetic scenes, all {len(offline.TASK_BUILDERS)} tasks, {len(records)} records",
        )
    ]


def fig_lifting(s: Settings) -> list[Row]:
    """tools/bench/lifting.py's dense PointFusion (full H x W x D maps, D running-mean floats per
    map point) against ours (sparse references), both voxelised."""
    from data_pipeline.lift.fusion import lift_fusion
    from data_pipeline.lift.voxelize import grid_for_bounds, voxelize
    from data_pipeline.render import render_scene
    from data_pipeline.scenes.synthetic import make_scene
    from tools.bench import lifting

    views_count, width, height, dim = 4, 320, 240, 1408
    scene = make_scene(0, 0)
    views = render_scene(scene, views_count, width, height, seed=0)
    bounds = (scene.vertices.min(0), scene.vertices.max(0))
    origin, voxel = grid_for_bounds(bounds[0] - 0.03, bounds[1] + 0.03)
    pixels = lifting.pixel_features(views, dim)
    got = {}

    def ours():
        got["ours"] = voxelize(lift_fusion(views, pixels, bounds), origin, voxel)["features"]

    def dense():
        got["dense"] = lifting.dense_fusion(views, pixels, bounds, origin, voxel)[1]

    # numpy only (nothing to compile): no warm-up, at most 2 repeats; the dense side moves a
    # 430 MB map per frame.
    repeats = min(s.repeats, 2)
    ours_s = median_seconds(ours, repeats, warmup=0)
    dense_s = median_seconds(dense, repeats, warmup=0)
    a, b = got["ours"].astype(np.float32), got["dense"]
    same = a.shape == b.shape
    if same:
        cos = np.sum(a * b, 1) / np.maximum(
            np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
        )
        check = f"same {len(a)} voxels, min cosine {cos.min():.4f}"
    else:
        check = f"voxel counts differ: {len(a)} vs {len(b)}"
    return [
        Row(
            f"lifting, fusion {width}x{height} D={dim}: ours vs naive dense",
            views_count / ours_s,
            views_count / dense_s,
            "frames/s",
            f"{views_count} views of one synthetic room, voxelised; {check}",
        )
    ]


FIGURES: dict[str, Callable[[Settings], list[Row]]] = {
    "lifting": fig_lifting,
    "pipeline": fig_pipeline,
    "train": functools.partial(train_rows, "demo"),
    # MFU only: the PyTorch step of this ~100M model takes 3-15 s on 2 cores.
    "train_large": functools.partial(train_rows, "compute", compare_torch=False),
    "decode": fig_decode,
    "render": fig_render,
    "language": fig_language,
}


# ---------------------------------------------------------------------------------------------
# the table and where it goes


def run_figures(
    figures: dict[str, Callable[[Settings], list[Row]]], settings: Settings
) -> list[Row]:
    """Every figure in turn; one that fails becomes a row saying why (traceback on stderr)."""
    rows = []
    progress = tqdm(figures.items(), desc="bench", unit="figure", file=sys.stderr)
    for name, figure in progress:
        progress.set_postfix_str(name)
        try:
            rows += figure(settings)
        except Exception as err:  # a broken figure must not hide the others
            traceback.print_exc()
            rows.append(Row(name, None, None, "", f"failed: {type(err).__name__}: {err}"))
    return rows


def _number(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def table_lines(rows: list[Row], markdown: bool) -> list[str]:
    header = ("figure", "ours", "reference", "ratio", "units", "notes")
    cells = [
        (r.figure, _number(r.ours), _number(r.reference), _number(r.ratio), r.units, r.note)
        for r in rows
    ]
    if markdown:
        esc = lambda c: c.replace("|", "\\|")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(5)]
    fmt = lambda row: (
        "  ".join(
            c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        )
        + ("  " + row[5] if row[5] else "")
    )
    return [fmt(header), "-" * (sum(widths) + 10)] + [fmt(row) for row in cells]


def machine_info(torch_versions: str) -> dict:
    """What the figures ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = jax.devices()[0]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "devices": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
        "torch": torch_versions,
        "python": f"{platform.python_version()} ({sys.executable})",
        "git_commit": commit,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
    }


def markdown(rows: list[Row], machine: dict, command: str, repeats: int, seconds: float) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` (`make bench` runs `python -m tools.bench`); every ratio is "
        "ours / reference, both measured in the same run.",
        "",
        *table_lines(rows, markdown=True),
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in machine.items()),
        "",
        "## Notes",
        "",
        f"- {TIMING_NOTE} N = {repeats} here; the whole run took {seconds / 60:.1f} min.",
        "- MFU = model FLOPs per step (3 x forward matmul FLOPs of the whole model, frozen parts "
        "included; `llm3d_jax.train.metrics.llm3d_flops`) / step time / the peak: a jitted float32 "
        "2048^3 matmul, best of 10 calls before and 10 after the timed steps. Model dtype "
        "float32. On a loaded machine the peak is what this process could get, not the chip's.",
        "- The PyTorch rows run transformers' Blip2QFormerModel + T5ForConditionalGeneration on "
        "the CPU with the same shapes and random weights (tools/bench/torch_reference.py), with "
        "the faster of 1 intra-op thread and torch's default (on a loaded machine OpenMP threads "
        "can wait on each other far longer than the work takes).",
        "- Decoding: EOS is suppressed on both sides so every row generates the full length; the "
        "no-cache loop re-runs the decoder over the whole answer buffer at each step.",
        "- Shared machine: other jobs ran at the same time (load average above), so absolute "
        "figures are noisy; side-by-side ratios are steadier but not immune.",
        "",
    ]
    return "\n".join(lines)


def load_torch_reference() -> tuple[object | None, str]:
    """(tools.bench.torch_reference, versions) when torch imports, else (None, why not)."""
    if importlib.util.find_spec("torch") is None:
        return None, TORCH_MISSING
    try:
        from tools.bench import torch_reference
    except Exception as err:  # a broken torch / transformers install: our rows still run
        return None, f"PyTorch reference unavailable: {type(err).__name__}: {err}"
    return torch_reference, torch_reference.VERSIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: {','.join(FIGURES)}"
    )
    parser.add_argument("--out", default="bench_out", help="folder for bench.json")
    parser.add_argument("--doc", default="docs/benchmarks.md", help="markdown copy of the table")
    args = parser.parse_args(argv)
    chosen = [n for n in args.only.split(",") if n] or list(FIGURES)
    unknown = sorted(set(chosen) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    torch_ref, torch_versions = load_torch_reference()
    settings = Settings(repeats=args.repeats, torch_ref=torch_ref, torch_versions=torch_versions)
    machine = machine_info(torch_versions)
    start = time.perf_counter()
    rows = run_figures({n: FIGURES[n] for n in chosen}, settings)
    seconds = time.perf_counter() - start

    print("\n".join(table_lines(rows, markdown=False)))
    print(f"\n{TIMING_NOTE} N = {args.repeats}; {seconds / 60:.1f} min in all.")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['devices']}, "
          f"jax {machine['jax']}, {torch_versions}, load {machine['load_average_1m']}")  # fmt: skip
    command = " ".join(["python -m tools.bench", *(sys.argv[1:] if argv is None else argv)])
    result = {
        "command": command,
        "machine": machine,
        "repeats": args.repeats,
        "seconds": seconds,
        "rows": [{**dataclasses.asdict(r), "ratio": r.ratio} for r in rows],
    }
    json_path = os.path.join(args.out, "bench.json")
    write_text_atomic(json_path, json.dumps(result, indent=2) + "\n")
    text = markdown(rows, machine, command, args.repeats, seconds)
    if os.path.exists(args.doc):  # the section tools/bench/input_pipeline.py writes stays
        from tools.bench import input_pipeline

        with open(args.doc, encoding="utf-8") as f:
            kept = input_pipeline.section_of(f.read())
        text = text + "\n" + kept if kept else text
    write_text_atomic(args.doc, text)
    print(f"wrote {json_path} and {args.doc}")
    return 0


if __name__ == "__main__":
    cli_main(main)
