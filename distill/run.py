"""Build everything a config names and train it: the body of every rank."""

from pathlib import Path

import torch

from distill.checkpoint import CheckpointError, Checkpointer, latest_checkpoint
from distill.config.schema import Config
from distill.data import build_data
from distill.distributed import Runtime, init_runtime
from distill.methods import build_method
from distill.models import build_adapter
from distill.roles import attach_optimizers, build_roles
from distill.tracking import Tracker, log
from distill.validation.validator import build_validator
from distill.trainer import Trainer


def build_trainer(config: Config, run_dir: Path, runtime: Runtime = None, stop=None) -> Trainer:
    runtime = runtime or init_runtime(config.training.device)
    if config.training.torch_threads:
        torch.set_num_threads(config.training.torch_threads)
    data = build_data(config, runtime.rank, runtime.world_size, runtime.device.type)  # checks the data first
    adapter = build_adapter(config.model)
    roles = build_roles(config, adapter, runtime)
    method = build_method(config, adapter, roles, runtime.device)
    attach_optimizers(roles, method.updates_per_role(config.training.max_steps))
    for name, role in roles.items():
        count = sum(p.numel() for p in role.module.parameters())
        log.info("role %s: %.3fM parameters (this rank), %s", name, count / 1e6, "trainable" if role.trainable else "frozen")
    t = config.training
    tracker = Tracker(run_dir, config, total_steps=t.max_steps, log_every=t.log_every, enabled=runtime.is_main)
    return Trainer(
        method,
        roles,
        data,
        run_dir,
        max_steps=config.training.max_steps,
        grad_accum_steps=config.training.grad_accum_steps,
        log_every=config.training.log_every,
        runtime=runtime,
        checkpointer=Checkpointer(run_dir, config, runtime, config.training.keep_last),
        checkpoint_every=config.training.checkpoint_every,
        stop=stop,
        tracker=tracker,
        samples_per_step=config.data.batch_size * t.grad_accum_steps * runtime.world_size,
        validator=build_validator(config, adapter, run_dir, runtime),
        validation_every=config.validation.every,
    )


def print_summary(validator, run_dir: Path) -> None:
    """The final quality table (where the data has metrics) and where the pictures are."""
    rows = validator.history
    if rows:
        names = sorted({k.split("/")[1] for k in rows})
        keys = sorted({k.split("/")[2] for k in rows})
        lines = [f"{'':<22}" + "".join(f"{k:>18}" for k in keys)]
        for name in names:
            lines.append(f"{name:<22}" + "".join(f"{rows.get(f'val/{name}/{k}', float('nan')):>18.3f}" for k in keys))
        print("\n".join(lines))
    print(f"samples: {run_dir / 'samples'}")


def resume_point(config: Config, run_dir: Path):
    """The checkpoint this run continues from, or None."""
    if config.training.resume_from:
        path = Path(config.training.resume_from)
        if not path.is_dir():
            raise CheckpointError(f"training.resume_from={path}: no such checkpoint folder")
        return path
    if config.training.resume:
        return latest_checkpoint(run_dir)
    return None


def train(config: Config, run_dir: Path, runtime: Runtime = None, stop=None) -> Trainer:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(config, run_dir, runtime, stop)
    start = resume_point(config, run_dir)
    if start is not None:
        trainer.checkpointer.load(start, trainer)
        log.info("resumed from %s at step %d", start, trainer.step)
    if trainer.tracker.bar is not None:
        trainer.tracker.bar.n = trainer.step
    try:
        trainer.fit()
        trainer.validate()
        if trainer.runtime.is_main:
            print_summary(trainer.validator, run_dir)
    finally:
        trainer.tracker.close()
    if config.training.export_at_end and trainer.runtime.is_main:
        from distill.export import export_run

        for folder in export_run(latest_checkpoint(run_dir), run_dir / "export"):
            log.info("exported %s", folder)
    trainer.runtime.barrier()
    log.info("run folder: %s", run_dir)
    return trainer
