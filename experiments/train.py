r"""Trains a 3D-LLM, from one CPU to many hosts, with the same code.

    python experiments/train.py --config experiments/configs/demo.py --workdir RUN \
        [--config.total_steps=N --config.batch_size=B --config.seed=S \
         --config.data_dir=TFDS_DIR --config.checkpoint_every=N ...]

Writes RUN/metrics.jsonl (one JSON object per logged step), RUN/tensorboard/, RUN/loss.png and
RUN/checkpoints/ (orbax). Rerunning the same command resumes from the latest complete checkpoint.
SIGTERM (preemption) to any one process makes every process save the same step and exit with
status 143. Sections, top to bottom: config, mesh, model and shardings, data, state, step, loop.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
from tqdm import tqdm

from llm3d_jax.fileio import InputError, cli_main, write_text_atomic
from llm3d_jax.infer.decode import DecodeConfig
from llm3d_jax.train import checkpoint, config_checks, metrics, setup, sharding, validation
from llm3d_jax.train import state as state_lib
from llm3d_jax.train import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/configs/<name>.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: metrics, checkpoints, plots")


def train(
    config, workdir: str, config_path: str = "--config", preempted: list | None = None
) -> int:
    """The whole run; returns the exit status. `preempted` becomes non-empty when this process is
    asked to stop (main's SIGTERM handler). Every process then saves the same step and returns
    143: one process alone stops after its current (or first) step, several after the step
    following their next stop vote (`make_stop_vote`)."""
    preempted = [] if preempted is None else preempted
    # ------------------------------------------------------------------ config
    config_checks.check_config(config)
    # JAX's preemption service would replace main's SIGTERM handler with its own, and its sync
    # point (`reached_preemption_sync_point`, orbax's `reached_preemption`) can be missed: it is
    # step 1 when SIGTERM comes before a resumed run's first step, and orbax's save-finalize
    # thread reports an older step that can become the max. Processes agree by the vote instead.
    jax.config.update("jax_enable_preemption_service", False)
    sharding.maybe_initialize_distributed()
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    log(f"config: {config_path}, workdir {workdir}, {jax.process_count()} process(es)")

    # ------------------------------------------------------------------ mesh
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.batch_size, config.microbatches, mesh)
    if config.eval_every:
        sharding.check_batch(config.eval_batch_size, 1, mesh)
    log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")

    # ------------------------------------------------------------------ model and shardings
    module, pretrained_params, pretrained_moments = setup.build_model(config, with_optimizer=True)
    training = setup.build_training(config, mesh, module)
    init_fn, tx, patterns = training.init_fn, training.tx, training.patterns
    state_sh, frozen_sh = training.state_sh, training.frozen_sh
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    log(
        f"model: {count(training.trainable_abs):,} trainable / "
        f"{count(training.frozen_abs):,} frozen parameters"
    )
    abstract_state = state_lib.abstract_state(tx, training.trainable_abs, state_sh)

    # ------------------------------------------------------------------ data
    train_data = setup.build_data(config, mesh, module.config, train=True)
    eval_data = (
        setup.build_data(config, mesh, module.config, train=False) if config.eval_every else None
    )
    generation = build_generation(
        config, module, eval_data, state_sh, frozen_sh, sharding.batch_sharding(mesh)
    )

    # ------------------------------------------------------------------ state
    rng = jax.random.key(config.seed)
    with jax.set_mesh(mesh):
        if pretrained_params is None:
            state, frozen = state_lib.init_random(init_fn, tx, patterns, state_sh, frozen_sh, rng)
            frozen_ref = {
                "kind": "random_init",
                "seed": config.seed,
                "model": config.model.to_dict(),
            }
        else:
            # A released checkpoint's AdamW state (LAVIS .pth) becomes the Adam state here.
            state, frozen = state_lib.init_from_params(
                pretrained_params, tx, patterns, state_sh, frozen_sh, pretrained_moments
            )
            del pretrained_params, pretrained_moments
            path = os.path.abspath(config.model.pretrained)
            frozen_ref = {
                "kind": "pretrained",
                "path": path,
                "sha256": checkpoint.file_hashes(path),
            }
            if setup.is_lavis_checkpoint(config.model.pretrained):
                base = os.path.abspath(config.model.base)
                frozen_ref["base"] = {"path": base, "sha256": checkpoint.file_hashes(base)}
    frozen_ref["fingerprint"] = checkpoint.fingerprint(frozen)
    if is_main:  # written only once the config has passed every check
        write_text_atomic(
            os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
        )
    manager = checkpoint.make_manager(
        os.path.join(workdir, "checkpoints"), config.keep_checkpoints, config.checkpoint_every
    )
    restored = checkpoint.restore_latest(manager, abstract_state, train_data)
    if restored is not None:
        state, meta = restored
        saved = meta["frozen"]["fingerprint"]
        if saved != frozen_ref["fingerprint"]:
            raise InputError(
                manager.directory,
                f"frozen weights differ from the ones this run was trained on "
                f"(fingerprint {frozen_ref['fingerprint']} vs {saved} in the checkpoint)",
            )
        log(f"state: resumed from step {int(state.step)}")
    else:
        log("state: fresh start")
    start_step = int(jax.device_get(state.step))
    if start_step >= config.total_steps:
        log(f"state: already trained for {start_step} >= total_steps {config.total_steps} steps")
        return 0

    # ------------------------------------------------------------------ step
    data_sh = sharding.batch_sharding(mesh)
    batch = next(train_data)
    batch_abs = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=data_sh), batch
    )
    eval_step = jax.jit(step_lib.make_eval_step(module), out_shardings=sharding.replicated(mesh))
    # data.scene_cache = "device": the batches name the points, the step gathers them.
    scenes = getattr(train_data, "scene_cache", None)  # None: the host path, synthetic data
    cache_args = () if scenes is None else (scenes.arrays,)
    compiled = setup.compile_train_step(config, mesh, training, batch_abs, frozen, scenes)
    log(f"step: compiled; memory per device: {metrics.format_memory(compiled.memory_analysis())}")
    peak, peak_source = metrics.peak_flops()
    flops_per_step = config.batch_size * metrics.llm3d_flops(
        module.config.qformer,
        module.config.llm,
        config.data.num_points,
        config.data.prompt_len,
        config.data.answer_len,
    )
    log(
        f"step: {flops_per_step / 1e9:.2f} GFLOP per step; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})"
    )

    # ------------------------------------------------------------------ loop
    writer = metrics.MetricWriter(workdir, start_step)
    meta = {"frozen": frozen_ref, "config": json.loads(config.to_json_best_effort())}
    tokens_per_step = config.batch_size * (config.data.prompt_len + config.data.answer_len)
    val_rows = {}  # step -> validation metrics, written with that step's row
    # Step time = wall time between two logged steps, less the time spent saving checkpoints and
    # validating in between (host work, not the step's).
    clock = {"time": time.perf_counter(), "step": start_step, "excluded": 0.0}

    def log_step(done_step, device_metrics):
        if done_step % config.log_every and done_step not in val_rows and done_step != last:
            return
        row = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        step_time = (now - clock["time"] - clock["excluded"]) / max(done_step - clock["step"], 1)
        clock.update(time=now, step=done_step, excluded=0.0)
        row.update(
            step_time_s=step_time,
            tokens_per_s=tokens_per_step / step_time,
            mfu=flops_per_step / step_time / peak,
        )
        row.update(val_rows.pop(done_step, {}))
        writer.write(done_step, row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", mfu=f"{row['mfu']:.1%}")

    bar = tqdm(total=config.total_steps, initial=start_step, disable=not is_main, desc="train")
    pending = None  # (step, metrics still on device): fetched one step late, never blocking
    last = config.total_steps
    stop_vote = make_stop_vote(mesh) if jax.process_count() > 1 else None
    vote = None  # the previous step's stop vote, still on device
    stopped = False
    for step in range(start_step + 1, config.total_steps + 1):
        with jax.set_mesh(mesh):
            state, step_metrics = compiled(state, frozen, batch, rng, *cache_args)
        # Stop after this step? One process reads its own SIGTERM flag. Several read the vote
        # they all cast after the previous step (one value for all of them: they stop at the same
        # step), fetched one step late like the metrics, so it never stalls the devices.
        if stop_vote is None:
            stopped = bool(preempted)
        else:
            stopped = vote is not None and bool(vote)
            vote = None if stopped else stop_vote(bool(preempted))
        if stopped:
            last = step
        if pending is not None:
            log_step(*pending)
        pending = (step, step_metrics)
        if step == last or manager.should_save(step):
            jax.block_until_ready(state)  # the step's own time is not saving time
            start = time.perf_counter()
            checkpoint.save(manager, step, state, train_data, meta, force=True)
            clock["excluded"] += time.perf_counter() - start
        if step < last:
            batch = next(train_data)  # prepared while the step runs on the devices
        if eval_data is not None and step % config.eval_every == 0:
            jax.block_until_ready(state)
            start = time.perf_counter()
            val_rows[step] = evaluate(
                eval_step, state, frozen, eval_data, config.eval_steps, mesh, generation
            )
            clock["excluded"] += time.perf_counter() - start
        bar.update(1)
        if step == last:
            log_step(*pending)
            break
    bar.close()
    manager.wait_until_finished()
    writer.close()
    if stopped:
        log(f"SIGTERM: saved a checkpoint at step {last}; exiting")
        return 143
    if is_main:
        metrics.plot_loss(writer.path, os.path.join(workdir, "loss.png"))
    log(f"done: step {config.total_steps}; {writer.path}, {workdir}/loss.png")
    return 0


def make_stop_vote(mesh):
    """-> vote(flag) -> a replicated device bool, True when any process passed True.

    For runs of several processes: each passes its own SIGTERM flag, held on each of its devices
    (flags [num_devices], one per device), and every process gets the same all-reduced answer.
    Every process must call it at the same points of the run (it is a collective)."""
    num_devices = mesh.devices.size
    flags_sh = NamedSharding(mesh, P(mesh.axis_names))
    # Both values of this process's flags, made once: a vote sends nothing from the host.
    flags = {
        value: jax.make_array_from_callback(
            (num_devices,), flags_sh, lambda index, value=value: np.full((1,), value)
        )
        for value in (False, True)
    }
    any_flag = jax.jit(jnp.any, out_shardings=sharding.replicated(mesh))
    return lambda flag: any_flag(flags[flag])


def build_generation(config, module, eval_data, state_sh, frozen_sh, data_sh):
    """-> (jitted generate step, number of batches, text decoder or None), or None when
    `config.eval_generate_batches` is 0 (validation then reports the loss only)."""
    num_batches = int(config.get("eval_generate_batches", 0))
    if eval_data is None or num_batches <= 0:
        return None
    llm = module.config.llm
    decode_config = DecodeConfig(
        strategy="greedy",
        max_new_tokens=config.data.answer_len,
        eos_id=llm.eos_token_id,
        pad_id=llm.pad_token_id,
        loc_offset=llm.loc_offset,
        loc_bins=llm.loc_bins,
    )
    # Compiled once (fixed validation shapes); ids stay sharded like the batch rows.
    generate_step = jax.jit(
        validation.make_generate_step(module, decode_config),
        in_shardings=(state_sh.params, frozen_sh, data_sh),
        out_shardings=data_sh,
    )
    decode = None
    if config.data_source == "tfds":  # text and boxes: decode with the run's tokenizer
        from llm3d_jax import tokens
        from llm3d_jax.data.pipeline import load_tokenizer

        tokenizer = load_tokenizer(setup.tokenizer_dir(config))
        offset = tokens.add_location_tokens(tokenizer, llm.loc_bins)
        if offset != llm.loc_offset:
            raise InputError(
                None, f"tokenizer puts <loc0> at {offset}, the model at {llm.loc_offset}"
            )
        decode = validation.text_decoder(tokenizer, llm)
    return generate_step, num_batches, decode


def evaluate(eval_step, state, frozen, eval_data, num_batches: int, mesh, generation=None) -> dict:
    """Validation on the same batches every time -> {"val_loss": mean answer-token loss over
    `num_batches` batches} and, with `generation` (`build_generation`), val_em / val_acc25 of
    greedy answers to its first batches (llm3d_jax.train.validation)."""
    generate_step, generate_batches, decode = generation or (None, 0, None)
    ce = count = 0.0
    counts = []
    eval_data.reset()
    with jax.set_mesh(mesh):
        for i in range(max(num_batches, generate_batches)):
            batch = next(eval_data)
            if i < num_batches:
                sums = jax.device_get(eval_step(state.params, frozen, batch))
                ce, count = ce + float(sums[0]), count + float(sums[2])
            if i < generate_batches:
                ids = generate_step(state.params, frozen, batch)
                metadata = getattr(eval_data, "last_metadata", None)
                counts.append(validation.batch_counts(ids, batch, metadata, decode))
    row = {"val_loss": ce / max(count, 1.0)}
    if generation is not None:  # every process sums its rows' counts into the totals
        row.update(validation.summarize(validation.sum_over_processes(counts)))
    return row


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config_path = flags.FLAGS["config"].config_filename

    preempted = []  # SIGTERM stays with this handler: train() turns JAX's preemption service off
    signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

    def run() -> int:
        try:
            return train(_CONFIG.value, _WORKDIR.value, config_path, preempted)
        except InputError as err:
            if err.path is None:  # a bad config value: name the config file
                raise InputError(config_path, err.problem) from None
            raise

    cli_main(run)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
