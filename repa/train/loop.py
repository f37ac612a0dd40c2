"""The training loop: one function of a typed config, for every method, one CPU to many nodes.

`train(config)` knows nothing of the command line. Resuming is rerunning the same command: with
`resume=auto` the newest complete checkpoint is loaded. A method (repa/train/methods/) owns its
step maths and state; the step policy every method shares is repa/train/step.py; this file owns
devices, precision, distribution, the data stream, checkpoints, pre-emption, logging and
preview samples.

Determinism: every process reseeds torch from (seed, rank, step) before each step, and the data
stream is rebuilt from (seed, rank, batches consumed) after every periodic checkpoint, so a run
resumed from a periodic checkpoint sees exactly the batches and noise an uninterrupted run would
(tests/test_train.py checks bitwise-equal weights on CPU). A pre-emption checkpoint taken between
periodic ones resumes with a fresh deterministic stream that does not replay seen batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from repa.config import ExperimentConfig, save_config
from repa.precision import PrecisionChoice, resolve_precision
from repa.runs import read_record
from repa.train import checkpoint as ckpt
from repa.train.distributed import check_shared_run_dir, process_group_timeout
from repa.train.ema import EMA
from repa.train.logging import MetricsLogger
from repa.train.methods import get_method
from repa.train.methods.base import MethodContext
from repa.train.randomness import derive_seed
from repa.train.runlock import RunLock, RunLockedError
from repa.train.setup import build_parts, cached_fields, read_shard_manifest
from repa.train.step import StepRunner
from repa.train.watchdog import StepWatchdog
from repa.utils.process import die_with_parent


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    preempted: bool
    nonfinite_steps: int
    last_metrics: dict
    model: torch.nn.Module  # the online model (unwrapped), on this process's device
    ema_model: torch.nn.Module
    stop_signal: int = 0  # the signal this process received when preempted (0: another rank's)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the run stops before writing a bad checkpoint."""


def run_dir_for(config: ExperimentConfig) -> Path:
    """output_dir/exp_name; the default name is derived from the config, never from a counter,
    so rerunning a command finds its own run again."""
    name = config.run.exp_name
    if not name:
        encoder = config.encoder.encoder.replace(",", "+") if config.encoder.enabled else "none"
        name = f"{config.method}-{config.model.name.replace('/', '')}-{encoder}-seed{config.run.seed}"
    return Path(config.run.output_dir) / name


class _StopFlag:
    """SIGTERM / SIGUSR1 / the first Ctrl-C only set a flag; the loop agrees on it across ranks
    every step, saves a checkpoint at that step and returns. A second Ctrl-C aborts at once.
    (The data-loader workers ignore these signals: repa.data.stream.)"""

    def __init__(self):
        self.requested = False
        self.signal_number = 0
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. some test runners)
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            sys.stderr.write(
                "\nCtrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to "
                "abort without saving)\n"
            )
        self.requested = True
        self.signal_number = self.signal_number or signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _recorded_precision(path: Path) -> str | None:
    """The precision an earlier start of this run recorded (None: none recorded)."""
    try:
        return json.loads(path.read_text())["mixed_precision"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _environment(world_size: int, precision: PrecisionChoice) -> dict:
    import accelerate

    return {
        "world_size": world_size,
        "mixed_precision": precision.to_dict(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count(),
        "platform": platform.platform(),
        "argv": sys.argv,
    }


def warn_config_changes(saved: dict, current: dict, is_main: bool) -> None:
    """Resuming with other settings is allowed (e.g. more steps) but never silent."""
    changes = []
    for section, values in current.items():
        for key, value in values.items():
            before = saved.get(section, {}).get(key, value)
            if before != value and key not in ("resume",):
                changes.append(f"{section}.{key}: {before!r} -> {value!r}")
    if changes and is_main:
        print("resuming with a changed configuration:\n  " + "\n  ".join(changes), file=sys.stderr)


def train(config: ExperimentConfig) -> TrainResult:
    """Train (or resume) the run described by `config`; returns where it stopped."""
    with contextlib.ExitStack() as cleanup:  # the run-directory lock, the watchdog
        return _train(config, cleanup)


def _train(config: ExperimentConfig, cleanup: contextlib.ExitStack) -> TrainResult:
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list

    from repa.data.shards import check_local_shards, expand_shard_urls
    from repa.data.stream import make_train_stream, png_decoder

    config.validate()
    method_class = get_method(config.method)
    # Every rank computes in the same precision: rank 0's choice (a CPU probe, or a mixed
    # cluster, could otherwise split the job). Every rank resolves, so a bad choice fails on all.
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # Launched by torchrun, which starts each rank in a session of its own: if the launcher
        # dies (kill -9, a lost login node), the ranks stop as on a scheduler's SIGTERM instead
        # of training on as orphans beside a requeued job.
        die_with_parent(signal.SIGTERM)
    run = config.run
    # --dist-timeout, by default longer than any allowance of the watchdog (repa.train.distributed)
    distributed = PartialState(cpu=not torch.cuda.is_available(), timeout=process_group_timeout(run))
    chosen = [resolve_precision(config.run.mixed_precision)]
    precision = (
        broadcast_object_list(chosen, from_process=0)[0] if distributed.num_processes > 1 else chosen[0]
    )
    if not config.data.data:
        raise ValueError("--data is required: training shards (see `repa data build`)")
    check_local_shards(expand_shard_urls(config.data.data), hint=" (check --data)")
    manifest = read_shard_manifest(config)

    # accelerate keeps precision and gradient settings in process-wide singletons; train() may run
    # several times in one process (the demo, notebooks, tests) with other settings. The
    # distributed state (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=precision.name,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        # Without cpu=True, accelerate ignores torchrun's environment on a machine with no GPU and
        # every process would train alone on the same data.
        cpu=not torch.cuda.is_available(),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    launched_world = int(os.environ.get("WORLD_SIZE", world))
    if launched_world != world:
        raise RuntimeError(
            f"launched with WORLD_SIZE={launched_world} but accelerate set up {world} process(es)"
        )
    accum = config.optim.gradient_accumulation_steps
    per_rank = config.data.batch_size // accum
    if per_rank % world:
        raise ValueError(
            f"--batch-size {config.data.batch_size} / accumulation {accum} = {per_rank} is not divisible by "
            f"{world} processes"
        )
    per_rank //= world
    if config.run.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    run_dir = run_dir_for(config)
    checkpoints_dir = run_dir / "checkpoints"
    # One writer per run directory: the main process takes the lock, every rank learns the outcome.
    refusal = [None]
    if accelerator.is_main_process:
        run_lock = RunLock(run_dir, stale_after=run.lease_stale_after)
        try:
            note = run_lock.acquire()
        except RunLockedError as error:
            refusal = [str(error)]
        else:
            cleanup.callback(run_lock.release)
            if note:
                print(note, file=sys.stderr, flush=True)
    if world > 1:
        refusal = broadcast_object_list(refusal, from_process=0)
    if refusal[0] is not None:
        raise RunLockedError(refusal[0])
    check_shared_run_dir(run_dir, rank, world)  # every rank must see what rank 0 writes there
    watchdog = StepWatchdog(
        run_dir,
        rank,
        lambda: ckpt.latest_checkpoint(checkpoints_dir),
        run.step_timeout,
        run.long_phase_timeout,
    )
    cleanup.callback(watchdog.stop)
    watchdog.long_phase("starting up")
    if accelerator.is_main_process:
        ckpt.remove_stale_staging(checkpoints_dir)
        save_config(config, run_dir / "config.yaml")
        print(precision.summary(), flush=True)
        previous = _recorded_precision(run_dir / "environment.json")
        if previous and previous != precision.name:
            print(
                f"warning: this run trained in {previous!r} so far and continues in {precision.name!r} "
                f"(another machine?); pass --mixed-precision {previous} to keep it",
                file=sys.stderr,
                flush=True,
            )
        (run_dir / "environment.json").write_text(json.dumps(_environment(world, precision), indent=1))
    accelerator.wait_for_everyone()

    # --- resume: which checkpoint (before the parts: a method may need fewer of them later) ---
    step, nonfinite_total = 0, 0
    data_state: dict = {}  # this rank's stream counters at the checkpoint
    # The main process verifies the checkpoint (a full read of every file) and tells the others
    # which one it picked: the files are read once per job, not once per rank.
    picked: list = [None]
    if accelerator.is_main_process:
        try:
            picked = [ckpt.resolve_resume(config.run.resume, checkpoints_dir)]
        except (FileNotFoundError, ckpt.DamagedCheckpointError) as error:
            picked = [error]
    if world > 1:
        picked = broadcast_object_list(picked, from_process=0)
    if isinstance(picked[0], Exception):
        raise picked[0]
    resume_from = picked[0]
    start_step = 0 if resume_from is None else int(read_record(resume_from)["step"])

    torch.manual_seed(derive_seed(config.run.seed, 0, -1))  # identical initial weights on every rank
    tokenizer, encoders, model = build_parts(
        config, device, method_class.model_options, method_class.needs_encoders(config, start_step)
    )
    ema = EMA(model, decay=config.optim.ema_decay)  # before the method, which may read it (SRA)
    method = method_class.build(
        MethodContext(config, tokenizer, encoders, model, device, world, ema.model, start_step)
    )
    ema.copy_from(model)  # the average starts from the model as the method left it (REPA-E's BatchNorm)
    groups = method.groups()
    # fp16 needs loss scaling; one scaler serves every group (PyTorch's multi-optimiser recipe)
    scaler = torch.amp.GradScaler(device.type) if precision.name == "fp16" else None

    if resume_from is not None:
        from safetensors.torch import load_file

        state = ckpt.load_file(resume_from / "model.pt")
        warn_config_changes(state.get("config", {}), config.to_dict(), accelerator.is_main_process)
        model.load_state_dict(state["model"])
        ema.load_state_dict(load_file(resume_from / "ema.safetensors"))
        saved_optimizers = state.get("optimizers")
        if saved_optimizers is None and "optimizer" in state and len(groups) == 1:
            saved_optimizers = {groups[0].name: state["optimizer"]}  # written before parameter groups
        saved_optimizers = saved_optimizers or {}
        missing = [group.name for group in groups if group.name not in saved_optimizers]
        if missing:
            raise ValueError(
                f"{resume_from} has no optimiser state for parameter group(s) {missing} (it holds "
                f"{sorted(saved_optimizers) or 'one optimiser, in the layout before parameter groups'}): "
                "was it written by another --method, or by a repa from before parameter groups?"
            )
        for group in groups:
            group.optimizer.load_state_dict(saved_optimizers[group.name])
        method.load_state_dict(state.get("method", {}))
        step, nonfinite_total = int(state["step"]), int(state.get("nonfinite_steps", 0))
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng_file = resume_from / f"rng-rank{rank}.pt"
        if rng_file.exists():  # absent when the world size grew; the per-step reseed covers it
            rng_state = ckpt.load_file(rng_file)
            ckpt.restore_rng_state(rng_state)
            data_state = rng_state.get("data", {})

    compiled = torch.compile(model) if config.run.compile else model
    prepared_model = accelerator.prepare(compiled)
    runner = StepRunner(
        method,
        prepared_model,
        model,
        ema,
        accumulation=accum,
        seed=config.run.seed,
        rank=rank,
        world_size=world,
        device=device,
        autocast=accelerator.autocast,
        no_sync=lambda: accelerator.no_sync(prepared_model),
        scaler=scaler,
    )

    # The stream reads only the fields the method's step reads (no PNG when all it needs is cached).
    in_shards = cached_fields(config, manifest, tokenizer, encoders)
    fields = method.batch_fields(frozenset(n for n, on in zip(("latents", "features"), in_shards) if on))
    with_latents, with_features = "latents" in fields, "features" in fields
    if accelerator.is_main_process:  # what a step computes: the compute axis of `repa curves`
        targets = {"latents_cached": with_latents, "features_cached": with_features}
        (run_dir / "targets.json").write_text(json.dumps(targets))
    if accelerator.is_main_process and (encoders or tokenizer.name != "pixels"):
        print(
            "targets: "
            + ", ".join(
                f"{part} {'cached in the shards' if cached else 'computed every step'}"
                for part, cached, used in (
                    ("latents", with_latents, tokenizer.name != "pixels"),
                    ("encoder tokens", with_features, bool(encoders)),
                )
                if used
            )
            + (f"; images decoded by {png_decoder()}" if "images" in fields else "; images not read"),
            flush=True,
        )
    stream = make_train_stream(
        config.data.data,
        batch_size_per_rank=per_rank,
        rank=rank,
        world_size=world,
        num_workers=config.data.num_workers,
        seed=config.run.seed,
        resume_batches=step * accum,
        shuffle_buffer=config.data.shuffle_buffer,
        flip=config.data.random_flip,
        fields=fields,
    )
    # Samples this rank skipped before the checkpoint keep counting in `data_skipped`.
    stream.load_state_dict(
        {"batches_seen": stream.batches_seen, "num_skipped": data_state.get("num_skipped", 0)}
    )

    logger = MetricsLogger(
        run_dir,
        enabled=accelerator.is_main_process,
        report_to=config.run.report_to,
        config=config.to_dict(),
        wandb_project=config.run.wandb_project,
        wandb_mode=config.run.wandb_mode,
    )
    periodic_eval = None
    if config.run.eval_every:
        text_model = bool(getattr(model.config, "context_dim", 0))
        periodic_eval = make_periodic_eval(config, tokenizer, device, rank, world, text_model=text_model)
    stop = _StopFlag()
    progress = None
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.run.max_train_steps, initial=step, desc=run_dir.name, dynamic_ncols=True)

    space_warned = False

    def save(at_step: int) -> None:
        nonlocal space_warned
        last = ckpt.latest_checkpoint(checkpoints_dir)
        if last is not None and accelerator.is_main_process and not space_warned:
            needed, free = ckpt.directory_bytes(last), shutil.disk_usage(checkpoints_dir).free
            if free < 1.2 * needed:
                space_warned = True
                print(
                    f"warning: {free / 2**20:.0f} MiB free on the device of {checkpoints_dir}, and a "
                    f"checkpoint takes about {needed / 2**20:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        staging = ckpt.begin_save(
            checkpoints_dir, at_step, accelerator.is_main_process, accelerator.wait_for_everyone
        )
        try:
            write_checkpoint_files(at_step, staging)
        except Exception as error:
            if not ckpt.is_disk_full(error):
                raise
            message = ckpt.disk_full_message(checkpoints_dir, at_step, staging)
            shutil.rmtree(staging, ignore_errors=True)  # the space it holds is the user's
            raise ckpt.DiskFullError(message) from None

    def write_checkpoint_files(at_step: int, staging: Path) -> None:
        checksums = {}  # hashed while written; commit_save hashes the other ranks' and export's files
        if accelerator.is_main_process:
            checksums["model.pt"] = ckpt.save_file(
                {
                    "model": model.state_dict(),
                    "optimizers": {group.name: group.optimizer.state_dict() for group in groups},
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "step": at_step,
                    "nonfinite_steps": nonfinite_total,
                    "config": config.to_dict(),
                    "method": method.state_dict(),
                },
                staging / "model.pt",
            )
            method.export(ema.model, staging)
            ema_state = {k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}
            from repa.runs import decode_tokenizer

            # what decodes these samples travels with the weights (a copied ema.safetensors too)
            decoder = decode_tokenizer(config.to_dict(), staging)
            metadata = {"config": json.dumps(config.to_dict()), "decode_tokenizer": json.dumps(decoder)}
            checksums["ema.safetensors"] = ckpt.save_safetensors(
                ema_state, staging / "ema.safetensors", metadata=metadata
            )
        rng_state = ckpt.capture_rng_state()
        rng_state["data"] = {"batches_seen": stream.batches_seen, "num_skipped": stream.num_skipped}
        checksums[f"rng-rank{rank}.pt"] = ckpt.save_file(rng_state, staging / f"rng-rank{rank}.pt")
        ckpt.commit_save(
            checkpoints_dir,
            at_step,
            world,
            accelerator.is_main_process,
            accelerator.wait_for_everyone,
            keep_last=config.run.keep_checkpoints,
            keep_every=config.run.keep_every,
            checksums=checksums,
        )

    last_metrics: dict = {}
    nonfinite_streak = 0
    preempted = False
    data_iter = iter(stream)
    window_start, window_samples = time.perf_counter(), 0
    model_group = runner.model_group().name
    try:
        while step < config.run.max_train_steps:
            outcome = runner.run(step, data_iter, lambda: (stop.requested, stream.num_skipped))
            watchdog.long_phase(f"logging, evaluating or saving after step {step + 1}")  # next
            window_samples += outcome.samples * world
            stop_now, data_skipped = outcome.stop, outcome.data_skipped
            if outcome.nonfinite:
                nonfinite_streak += 1
                nonfinite_total += 1
                if nonfinite_streak >= config.run.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"{nonfinite_streak} non-finite steps in a row at step {step} (loss or gradient "
                        f"NaN/inf); stopped before writing a checkpoint. Lower --learning-rate, check the "
                        f"data, or use --mixed-precision bf16. Last complete checkpoint: "
                        f"{ckpt.latest_checkpoint(checkpoints_dir)}"
                    )
            elif not outcome.skipped:
                nonfinite_streak = 0
            step += 1

            if progress is not None:
                progress.update(1)
            if step % config.run.log_every == 0 or step == config.run.max_train_steps:
                elapsed = time.perf_counter() - window_start
                last_metrics = {
                    **{key: float(value) for key, value in outcome.metrics.items()},
                    # REPA's name for the diffusion model's norm; other groups carry theirs
                    **{
                        "grad_norm" if name == model_group else f"grad_norm_{name}": float(norm)
                        for name, norm in outcome.grad_norms.items()
                    },
                    "lr": runner.model_group().optimizer.param_groups[0]["lr"],  # the step's own
                    "samples_per_sec": window_samples / max(elapsed, 1e-9),
                    "samples_seen": step * config.data.batch_size,
                    "nonfinite_steps": nonfinite_total,
                    "data_skipped": data_skipped,  # corrupt or odd samples skipped so far, all ranks
                }
                logger.log(step, last_metrics)
                if progress is not None:
                    shown = {
                        k: f"{last_metrics[k]:.4f}"
                        for k in ("loss", "loss_align", "grad_norm")
                        if k in last_metrics
                    }
                    shown["img/s"] = f"{last_metrics['samples_per_sec']:.1f}"
                    progress.set_postfix(shown)
                window_start, window_samples = time.perf_counter(), 0

            if (
                config.run.sample_every
                and step % config.run.sample_every == 0
                and accelerator.is_main_process
            ):
                path = write_preview(ema.model, tokenizer, config, run_dir, step, device)
                logger.log_image(step, "samples", path)
            if periodic_eval is not None and step % config.run.eval_every == 0:
                scores = periodic_eval(ema.model)  # every rank samples its share
                logger.log(step, {f"eval/{k}": v for k, v in scores.items()})  # main process only

            periodic = step % config.run.checkpointing_steps == 0 or step == config.run.max_train_steps
            if periodic or stop_now:
                save(step)
            if stop_now:
                preempted = True
                if world > 1:  # the signal that stopped the job, also on ranks that did not get it
                    received = torch.tensor([stop.signal_number], device=device)
                    torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
                    stop.signal_number = int(received.item())
                break
            if periodic:
                # Rebuild the stream from (seed, rank, batches consumed): a run resumed from this
                # checkpoint then reads exactly what this one reads next.
                data_iter = iter(stream)
            watchdog.step(f"training step {step + 1}")
    finally:
        # Stop the loader workers now, also on an exception or a second Ctrl-C: they ignore
        # SIGTERM, so left to interpreter exit they would hold the process.
        data_iter.close()
        stop.restore()
        if progress is not None:
            progress.close()
        logger.close()
    accelerator.wait_for_everyone()
    return TrainResult(
        run_dir, step, preempted, nonfinite_total, last_metrics, model, ema.model, stop.signal_number
    )


def make_periodic_eval(
    config: ExperimentConfig,
    tokenizer,
    device,
    rank: int = 0,
    world_size: int = 1,
    *,
    text_model: bool = False,
):
    """`--eval-every`: score the EMA model with the same code as `repa curves`, at a smaller
    sample count, spread over every rank (each samples its share and computes its features; rank
    0 scores the gathered set). The evaluator is built once, at start-up, on every rank, and the
    reference statistics on rank 0, which alone scores, so a missing Inception file or reference
    set fails before training starts. A text model samples one image per caption: the first
    captions of --eval-ref when it is captioned shards (COCO val2014's, as REPA scores), else of
    the training shards."""
    from repa.eval.curves import evaluate_model
    from repa.eval.metrics import Evaluator

    run = config.run
    evaluator = Evaluator(run.eval_metrics.split(","), device=device)
    reference = evaluator.reference(run.eval_ref) if rank == 0 else None
    settings = _sampler_for(config, run.eval_num_steps, run.eval_cfg_scale)
    captions = _eval_captions(config) if text_model else None

    def evaluate(model) -> dict[str, float]:
        return evaluate_model(
            model, tokenizer, resolution=config.data.resolution, num_samples=run.eval_num_samples,
            ref=reference, evaluator=evaluator, settings=settings, path_type=config.transport.path_type,
            seed=run.seed, device=device, rank=rank, world_size=world_size, captions=captions,
        )  # fmt: skip

    return evaluate


def _eval_captions(config: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The captions --eval-every samples: --eval-ref's when it holds cached captions, else the
    training shards'; --eval-num-samples of them, (N, L, D), (N, L) and the N texts."""
    from repa.data.shards import locate_manifest, read_manifest
    from repa.eval.captions import captions_from_shards

    source, ref = config.data.data, config.run.eval_ref
    manifest_path = locate_manifest(ref) if Path(ref).is_dir() else None
    captioned = manifest_path is not None and Path(manifest_path).exists()
    if captioned and "text" in read_manifest(manifest_path).get("fields", {}):
        source = ref
    embeddings, mask, texts = captions_from_shards(source, config.run.eval_num_samples)
    if len(texts) < config.run.eval_num_samples:
        raise ValueError(
            f"--eval-num-samples {config.run.eval_num_samples}: a text model samples one image per caption "
            f"and {source} has {len(texts)} captioned images; lower --eval-num-samples"
        )
    return embeddings, mask, texts


def _sampler_for(config: ExperimentConfig, num_steps: int, cfg_scale: float):
    from repa.eval.sample import SamplerSettings

    # fp32, as before `auto` existed: preview and --eval-every curves stay comparable across
    # machines and with `repa curves --mixed-precision fp32`; the model's own --time-shift
    return SamplerSettings(
        mode="ode", method="euler", num_steps=num_steps, cfg_scale=cfg_scale, guidance_high=1.0,
        precision="fp32", time_shift=config.transport.time_shift,
    )  # fmt: skip


@torch.no_grad()
def write_preview(model, tokenizer, config: ExperimentConfig, run_dir: Path, step: int, device) -> Path:
    """A sample grid from the EMA model in eval mode (the reference samples the online model in
    train mode, label dropout on, and calls it EMA). Fixed labels and seeds across the run; the
    same sampling and decoding path as `repa sample`."""
    from repa.eval.checkpoints import Generator
    from repa.eval.sample import generate_images
    from repa.utils.images import save_image_grid

    generator = Generator(model, tokenizer, config.data.resolution, config.transport.path_type)
    labels = "balanced"
    if generator.text_conditioned:  # a text model draws the first 16 captions of its shards
        from repa.eval.captions import captions_from_shards

        generator, labels = generator.with_captions(*captions_from_shards(config.data.data, 16)), "ordered"
    settings = _sampler_for(config, config.run.sample_steps, config.run.sample_cfg_scale)
    model.eval()
    batches = generate_images(generator, 16, settings, seed=config.run.seed, labels=labels, device=device)
    path = run_dir / "samples" / f"step-{step:08d}.png"
    save_image_grid(torch.cat(list(batches)), path)
    return path
