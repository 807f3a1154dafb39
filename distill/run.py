"""Build everything a config names and train it: the body of every rank."""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from distill.checkpoint import Checkpointer
from distill.config.schema import Config
from distill.data import build_data
from distill.distributed import Runtime, init_runtime
from distill.methods import build_method
from distill.models import build_adapter
from distill.registry import method_class
from distill.rng import ProcessRNG
from distill.roles import attach_optimizers, build_roles
from distill.tracking import Tracker, log, set_aside_records_after
from distill.validation.validator import build_validator
from distill.trainer import Trainer


def fingerprint(config: Config, world_size: int) -> dict:
    """What a checkpoint's tensors and data positions depend on; all must match to resume."""
    items = {
        "method.name": config.method.name,
        "model.family": config.model.family,
        "model.arch": OmegaConf.to_container(OmegaConf.create(dict(config.model.arch))),
        "model.latent_shape": list(config.model.latent_shape),
        "model.text_dim": config.model.text_dim,
        "data.name": config.data.name.value,
        "data.batch_size": config.data.batch_size,
        "world_size": world_size,
        **method_class(config.method.name).fingerprint(config.method),
    }
    for name, role in sorted(config.roles.items()):
        if role.trainable:
            items[f"roles.{name}.trainable"] = True
            items[f"roles.{name}.ema_decay"] = role.ema_decay is not None
            items[f"roles.{name}.lora"] = OmegaConf.to_container(OmegaConf.structured(role.lora))
    return items


def method_learning_rates(config: Config) -> dict:
    """Role name -> the learning rate the method's config holds for it."""
    keys = method_class(config.method.name).lr_keys(config.method)
    return {role: getattr(config.method, key) for role, key in keys.items()}


def build_checkpointer(config: Config, run_dir: Path, runtime: Runtime) -> Checkpointer:
    return Checkpointer(run_dir, config.checkpoint, runtime, fingerprint(config, runtime.world_size), config)


def build_trainer(config: Config, run_dir: Path, runtime: Runtime = None, stop=None) -> Trainer:
    runtime = runtime or init_runtime(config.training.device, config.parallel)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if config.training.torch_threads:
        torch.set_num_threads(config.training.torch_threads)
    data = build_data(config, runtime.dp_rank, runtime.dp_size, runtime.device.type)  # checks the data first
    adapter = build_adapter(config.model)
    roles = build_roles(config, adapter, runtime)
    method = build_method(config, adapter, roles, runtime.device)
    attach_optimizers(roles, method.updates_per_role(config.training.max_steps), method_learning_rates(config))
    for name, role in roles.items():
        log.info("role %s: %s", name, describe(role))
    t = config.training
    tracker = Tracker(run_dir, config, total_steps=t.max_steps, enabled=runtime.is_main)
    checkpointer = build_checkpointer(config, run_dir, runtime)
    trainer = Trainer(
        method,
        roles,
        data,
        run_dir,
        max_steps=t.max_steps,
        grad_accum_steps=t.grad_accum_steps,
        log_every=t.log_every,
        runtime=runtime,
        checkpointer=checkpointer,
        stop=stop,
        tracker=tracker,
        samples_per_step=config.data.batch_size * t.grad_accum_steps * runtime.dp_size,
        validator=build_validator(config, adapter, run_dir, runtime),
        validation_every=config.validation.every,
        evaluation=build_evaluation(config, adapter, run_dir, runtime),
    )
    # what a checkpoint holds, in load order: the RNG last
    for name, role in roles.items():
        if role.trainable:
            checkpointer.register(f"role.{name}", role)
    checkpointer.register("trainer", trainer)
    checkpointer.register("data", data, per_rank=True)
    checkpointer.register("method", method, per_rank=True)
    checkpointer.register("rng", ProcessRNG(), per_rank=True)
    return trainer


def build_evaluation(config: Config, adapter, run_dir: Path, runtime: Runtime):
    """validation.evaluate.every > 0: the live student's evaluation on the prompt file."""
    if not config.validation.evaluate.every:
        return None
    from distill.evaluation.live import LiveEvaluation

    return LiveEvaluation(config, adapter, run_dir, runtime)


def describe(role) -> str:
    """Parameters on this rank, and what trains."""
    total = sum(p.numel() for p in role.module.parameters())
    where = " (this rank, FSDP2-sharded)" if role.sharded else " (this rank)"
    if not role.trainable:
        return f"{total / 1e6:.3f}M parameters{where}, frozen" + (", adapters off" if role.adapters_off else "")
    trained = sum(p.numel() for p in role.module.parameters() if p.requires_grad)
    lora = role.cfg.lora
    how = f"LoRA rank {lora.rank}" + (f" on {lora.base_role}'s network" if lora.base_role else "") if lora.rank else "all"
    return f"{total / 1e6:.3f}M parameters{where}, {trained / 1e6:.3f}M trained ({how})"


def print_summary(validator, run_dir: Path) -> None:
    """The final quality table (where the data has metrics) and where the pictures are; the
    student also as the mean of its last 2 validations, which swing by points of FD."""
    rows = validator.history
    if rows:
        names = sorted({k.split("/")[1] for k in rows})
        keys = sorted({k.split("/")[2] for k in rows})
        student = f"student_{validator.student_sampler.num_steps}step"
        table = {name: {k: rows.get(f"val/{name}/{k}", float("nan")) for k in keys} for name in names}
        if validator.recent_student_mean() and student in table:
            table[f"{student}, last 2"] = validator.recent_student_mean()
        lines = [f"{'':<22}" + "".join(f"{k:>18}" for k in keys)]
        for name, values in table.items():
            lines.append(f"{name:<22}" + "".join(f"{values.get(k, float('nan')):>18.3f}" for k in keys))
        print("\n".join(lines))
    print(f"samples: {run_dir / 'samples'}")


class RunFinished(Exception):
    """The run's newest checkpoint is at or past training.max_steps: nothing to do."""

    def __init__(self, step: int, max_steps: int, run_dir: Path):
        super().__init__(f"the run in {run_dir} is finished at step {step} (training.max_steps={max_steps}); "
                         "nothing to do: a larger training.max_steps extends it")
        self.step = step


def train(config: Config, run_dir: Path, runtime: Runtime = None, stop=None) -> Trainer:
    """Train from scratch, or from the run's newest intact checkpoint (checked
    before any model is built); raises RunFinished when there is nothing left.
    A process group made here (one rank sharding) is closed here."""
    if runtime is not None:
        return _train(config, run_dir, runtime, stop)
    runtime = init_runtime(config.training.device, config.parallel)
    try:
        return _train(config, run_dir, runtime, stop)
    finally:
        runtime.shutdown()


def _train(config: Config, run_dir: Path, runtime: Runtime, stop=None) -> Trainer:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = build_checkpointer(config, run_dir, runtime).resume_point()
    if start is not None:
        step = Checkpointer.step_of(start)
        if step >= config.training.max_steps:
            raise RunFinished(step, config.training.max_steps, run_dir)
        log.info("resuming from %s (step %d)", start, step)
        if runtime.is_main:
            moved = set_aside_records_after(run_dir / "metrics.jsonl", step)
            if moved:
                log.info("%d records after step %d moved to metrics.discarded.jsonl", moved, step)
    trainer = build_trainer(config, run_dir, runtime, stop)
    if start is not None:
        trainer.checkpointer.load(start)
        log.info("resumed from %s at step %d", start, trainer.step)
    if trainer.tracker.bar is not None:
        trainer.tracker.bar.n = trainer.step
        trainer.tracker.bar.refresh()
    try:
        trainer.fit()
        trainer.validate()
        trainer.evaluate()
    finally:
        trainer.checkpointer.close()
        trainer.tracker.close()
    if trainer.runtime.is_main:
        print_summary(trainer.validator, run_dir)
    if config.training.export_at_end and trainer.runtime.is_main:
        from distill.export import export_run

        for folder in export_run(trainer.checkpointer.latest(), run_dir / "export"):
            log.info("exported %s", folder)
    trainer.runtime.barrier()
    log.info("run folder: %s", run_dir)
    return trainer
