"""Checks that span several config fields, run before anything is built.

The generic checks live here; the method and the model family check their
own parts (`Method.check`, `FlowMatchingAdapter.check`), found through the
registry. Each failure raises ConfigError with a message that names the key
and what it may be, so that launch.py can print it and exit without a
traceback.
"""

import dataclasses
import os
import re
from pathlib import Path
from typing import List

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.config.schema import Config
from distill.registry import family_class, method_class


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


def validate(cfg: DictConfig) -> Config:
    """Resolve the composed config into typed dataclasses and check it."""
    unknown = unknown_keys(cfg) + _check_required(cfg)
    if unknown:
        raise ConfigError("\n".join(unknown))
    try:
        method = method_class(OmegaConf.select(cfg, "method.name"))
        family = family_class(OmegaConf.select(cfg, "model.family"))
    except KeyError as err:
        raise ConfigError(err.args[0]) from None
    schema = OmegaConf.get_type(cfg.model)
    if schema is not family.config_class:
        raise ConfigError(
            f"model.family={family.family}: the model section was composed from {schema.__name__}, not "
            f"{family.config_class.__name__}; a model YAML names its family's keys first "
            f"(defaults: [/schema/model@_here_: {family.family}, _self_])")
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err)) from None
    errors = (
        _check_roles(config, method)
        + [*method.check(config.method)]
        + _check_training(config)
        + _check_ranges(config)
        + _check_attention_backend(config.model.attention_backend)
        + _check_codecs(config.model, family)
        + _check_parallel(config, family)
        + _derive_accumulation(config)
        + _check_data(config, method)
        + family.check(config)
        + method.check_model(config.method, config.model)
        + method.check_parallel(config.method, config.parallel)
    )
    if not errors:  # the networks' own configs are read once the keys naming them are sound
        errors = _check_block_indices(config, method, family) + _check_lora_targets(config, family)
    if errors:
        raise ConfigError("\n".join(errors))
    return config


def _check_block_indices(config: Config, method, family) -> List[str]:
    """Block indices a method names (the GAN's feature taps) against the depth of the
    network they index, read from its config file."""
    errors = []
    for key, (role, indices) in method.block_indices(config.method).items():
        arch, source, error = family.role_architecture(config, role) if role in config.roles else (None, "", None)
        depth = family.depth(arch) if arch is not None and error is None else None
        outside = [i for i in indices if depth is not None and not -depth <= i < depth]
        if outside:
            errors.append(f"{key}={list(indices)}: {', '.join(map(str, outside))} outside the {depth} blocks of "
                          f"roles.{role}'s network ({source}); allowed: {-depth} to {depth - 1}")
    return errors


def _check_lora_targets(config: Config, family) -> List[str]:
    """Each lora.target_modules entry must name a linear layer of the network, as peft
    matches it (the full name, or its end after a dot); built on the meta device."""
    errors = []
    for name, role in config.roles.items():
        targets = role.lora.target_modules
        if not role.lora.rank or not targets:
            continue
        arch, source, error = family.role_architecture(config, role.lora.base_role or name)
        layers = family.layer_names(arch) if arch is not None and error is None else None
        if layers is None:
            continue
        missing = [t for t in targets if not any(layer == t or layer.endswith(f".{t}") for layer in layers)]
        if missing:
            kinds = sorted({re.sub(r"^blocks\.\d+\.", "", layer) for layer in layers})
            errors.append(f"roles.{name}.lora.target_modules: no linear layer of the network ({source}) matches "
                          f"{', '.join(missing)}; its layers: {', '.join(kinds)}")
    return errors


def _check_required(cfg: DictConfig) -> List[str]:
    """The keys the recipe lists under `required` that are still null."""
    if OmegaConf.select(cfg, "plan"):
        return []
    required = OmegaConf.select(cfg, "required") or {}
    return [f"{key} is null: this recipe needs it ({why})" for key, why in required.items()
            if OmegaConf.select(cfg, key) is None]


def unknown_keys(node, path: str = "") -> List[str]:
    """Keys of typed nodes that their dataclass lacks. Hydra lets `+key=value`
    add a key even to a typed node; such a key would be silently dropped."""
    errors = []
    if not isinstance(node, DictConfig):
        return errors
    kind = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if fields is not None and key not in fields:
            errors.append(f"{full}: unknown key ({kind.__name__} has {', '.join(sorted(fields))})")
            continue
        if fields is None and path.startswith("hydra"):
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            errors += unknown_keys(child, full)
    return errors


def _check_roles(config: Config, method) -> List[str]:
    needed = method.roles
    name = config.method.name
    errors = []
    for role, trainable in needed.items():
        kind = "trainable" if trainable else "frozen"
        if role not in config.roles:
            errors.append(f"roles.{role} is missing: method {name} needs roles {sorted(needed)}")
        elif config.roles[role].trainable != trainable:
            errors.append(
                f"roles.{role}.trainable={str(config.roles[role].trainable).lower()}: "
                f"method {name} needs the {role} {kind} (allowed: {str(trainable).lower()})"
            )
    for role in config.roles:
        if role not in needed:
            errors.append(f"roles.{role} is not used by method {name} (its roles: {sorted(needed)})")
    method_lrs = method.lr_keys(config.method)
    errors += _check_offload(config)
    errors += method.check_roles(config.roles)
    for role, cfg in config.roles.items():
        if not cfg.trainable:
            if cfg.lora.rank:
                errors.append(f"roles.{role}.lora.rank={cfg.lora.rank}: LoRA needs a trainable role")
            if cfg.ema_decay is not None:
                errors.append(f"roles.{role}.ema_decay={cfg.ema_decay}: an average of weights needs a trainable role")
            continue
        errors += _check_optimizer(role, cfg, method_lrs)
        errors += _check_lora(role, cfg.lora)
        errors += _check_shared_base(role, cfg, config.roles)
    return errors


def _check_offload(config: Config) -> List[str]:
    errors = []
    shared = {cfg.lora.base_role for cfg in config.roles.values() if cfg.lora.base_role}
    for role, cfg in config.roles.items():
        if not cfg.cpu_offload:
            continue
        key = f"roles.{role}.cpu_offload=true"
        if cfg.trainable or role in shared:
            errors.append(f"{key}: only a frozen role's weights are offloaded (this one trains)")
        elif world_size(config.launcher) == 1:
            errors.append(f"{key}: offloading goes through FSDP2, which needs 2 or more ranks "
                          f"(the launcher gives 1)")
    return errors


def _check_shared_base(role: str, cfg, roles) -> List[str]:
    base = cfg.lora.base_role
    if base is None:
        return []
    key = f"roles.{role}.lora.base_role={base}"
    if base not in roles:
        return [f"{key}: no such role (roles: {', '.join(sorted(roles))})"]
    errors = []
    if cfg.lora.rank == 0:
        errors.append(f"{key}: needs roles.{role}.lora.rank > 0")
    if roles[base].trainable or roles[base].lora.base_role:
        errors.append(f"{key}: the base role must be frozen and load its own weights")
    if roles[base].precision != cfg.precision:
        errors.append(f"{key}: roles.{role}.precision={cfg.precision.value} must equal "
                      f"roles.{base}.precision={roles[base].precision.value} (they share one network)")
    if cfg.path is not None:
        errors.append(f"{key}: roles.{role}.path={cfg.path} must be null (the weights are roles.{base}'s)")
    sharers = [r for r, c in roles.items() if c.lora.base_role == base]
    if len(sharers) > 1:
        errors.append(f"{key}: roles {', '.join(sorted(sharers))} all adapt {base}; one role may")
    return errors


def _check_optimizer(role: str, cfg, method_lrs) -> List[str]:
    errors = []
    opt = cfg.optimizer
    if role in method_lrs and opt.lr is not None:
        errors.append(
            f"roles.{role}.optimizer.lr={opt.lr}: the {role}'s learning rate is method.{method_lrs[role]}; "
            "set that key instead (one value per learning rate)"
        )
    elif role not in method_lrs and opt.lr is None:
        errors.append(f"roles.{role}.optimizer.lr is null: the method sets no learning rate for {role}; give one")
    elif opt.lr is not None and not opt.lr > 0:
        errors.append(f"roles.{role}.optimizer.lr={opt.lr}: must be > 0")
    if opt.weight_decay < 0:
        errors.append(f"roles.{role}.optimizer.weight_decay={opt.weight_decay}: must be >= 0")
    if not opt.eps > 0:
        errors.append(f"roles.{role}.optimizer.eps={opt.eps}: must be > 0")
    sched = cfg.scheduler
    if sched.total_steps is not None and sched.total_steps < 1:
        errors.append(f"roles.{role}.scheduler.total_steps={sched.total_steps}: must be >= 1 (null: the run's length)")
    elif sched.total_steps is not None and sched.warmup_steps > sched.total_steps:
        errors.append(f"roles.{role}.scheduler.warmup_steps={sched.warmup_steps} exceeds "
                      f"roles.{role}.scheduler.total_steps={sched.total_steps}")
    if cfg.ema_start_step < 0:
        errors.append(f"roles.{role}.ema_start_step={cfg.ema_start_step}: must be >= 0")
    if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
        errors.append(f"roles.{role}.optimizer.betas={list(opt.betas)}: must be two numbers in [0, 1)")
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        errors.append(f"roles.{role}.max_grad_norm={cfg.max_grad_norm}: must be > 0 (null: no clipping)")
    if cfg.scheduler.warmup_steps < 0:
        errors.append(f"roles.{role}.scheduler.warmup_steps={cfg.scheduler.warmup_steps}: must be >= 0")
    if cfg.ema_decay is not None and not 0.0 <= cfg.ema_decay < 1.0:
        errors.append(f"roles.{role}.ema_decay={cfg.ema_decay}: must be in [0, 1)")
    return errors


def _check_lora(role: str, lora) -> List[str]:
    errors = []
    if lora.rank < 0:
        errors.append(f"roles.{role}.lora.rank={lora.rank}: must be >= 0 (0: no LoRA)")
    if lora.alpha is not None and not lora.alpha > 0:
        errors.append(f"roles.{role}.lora.alpha={lora.alpha}: must be > 0 (null: equal to the rank)")
    if not 0.0 <= lora.dropout < 1.0:
        errors.append(f"roles.{role}.lora.dropout={lora.dropout}: must be in [0, 1)")
    if lora.target_modules is not None and not lora.target_modules:
        errors.append(f"roles.{role}.lora.target_modules=[]: name at least one module, or null for the family's default")
    return errors


def _check_attention_backend(name) -> List[str]:
    """A backend diffusers knows, whose kernels this machine has (checked by diffusers)."""
    if name is None:
        return []
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    names = [b.value for b in AttentionBackendName]
    if name not in names:
        return [f"model.attention_backend={name}: allowed values are {', '.join(names)} (or null)"]
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as err:
        return [f"model.attention_backend={name}: not usable here ({err})"]
    return []


def _check_training(config: Config) -> List[str]:
    errors = []
    t = config.training
    for key in ("max_steps", "grad_accum_steps", "log_every"):
        if getattr(t, key) < 1:
            errors.append(f"training.{key}={getattr(t, key)}: must be >= 1")
    if t.device not in ("auto", "cpu", "cuda"):
        errors.append(f"training.device={t.device}: allowed values are auto, cpu, cuda")
    if t.compile and config.parallel.context > 1:
        errors.append("training.compile=true with parallel.context > 1: the context-parallel hooks are not "
                      "traced by the compiled blocks (allowed: training.compile=false)")
    ckpt = config.checkpoint
    for key in ("every", "keep_last"):
        if getattr(ckpt, key) < 0:
            errors.append(f"checkpoint.{key}={getattr(ckpt, key)}: must be >= 0 (0: {'only at the end' if key == 'every' else 'keep all'})")
    if "{step}" not in ckpt.folder or "/" in ckpt.folder or ckpt.folder.endswith(".tmp"):
        errors.append(f"checkpoint.folder={ckpt.folder}: must be a folder name holding {{step}}, e.g. checkpoint-{{step}}")
    if config.validation.every < 0:
        errors.append(f"validation.every={config.validation.every}: must be >= 0 (0: only at the end)")
    if config.validation.num_samples < 1:
        errors.append(f"validation.num_samples={config.validation.num_samples}: must be >= 1")
    launcher = config.launcher
    if launcher.name == "local" and launcher.nproc_per_node < 1:
        errors.append(f"launcher.nproc_per_node={launcher.nproc_per_node}: must be >= 1")
    if launcher.name == "slurm":
        for key in ("nodes", "cpus_per_task", "time_min", "array_parallelism"):
            if getattr(launcher, key) < 1:
                errors.append(f"launcher.{key}={getattr(launcher, key)}: must be >= 1")
        if launcher.gpus_per_node < 0 or launcher.max_requeues < 0:
            errors.append("launcher.gpus_per_node and launcher.max_requeues must be >= 0")
        if launcher.tasks_per_node is not None and launcher.tasks_per_node < 1:
            errors.append(f"launcher.tasks_per_node={launcher.tasks_per_node}: must be >= 1")
    return errors


def _check_ranges(config: Config) -> List[str]:
    """Single values of the model, training, data, validation, logger and launcher
    sections that no run can use."""
    m, t, d, v, launcher = config.model, config.training, config.data, config.validation, config.launcher
    minimum = {"model.text_len": (m.text_len, 1), "model.text_dim": (m.text_dim, 1),
               "training.collective_timeout_s": (t.collective_timeout_s, 1),
               "training.torch_threads": (t.torch_threads, 1), "data.shuffle_window": (d.shuffle_window, 1),
               "validation.teacher_steps": (v.teacher_steps, 1), "validation.fps": (v.fps, 1),
               "launcher.signal_delay_s": (launcher.signal_delay_s, 0), "launcher.mem_gb": (launcher.mem_gb, 1)}
    errors = [f"{key}={value}: must be >= {low}" for key, (value, low) in minimum.items()
              if value is not None and value < low]
    if not m.shift > 0:
        errors.append(f"model.shift={m.shift}: must be > 0 (1: no shift)")
    if any(n < 1 for n in m.latent_shape):
        errors.append(f"model.latent_shape={list(m.latent_shape)}: every size must be >= 1")
    for key, stats in (("model.latents_mean", m.latents_mean), ("model.latents_std", m.latents_std)):
        if stats is not None and m.latent_shape and len(stats) != m.latent_shape[0]:
            errors.append(f"{key} has {len(stats)} values for the {m.latent_shape[0]} latent channels "
                          f"(model.latent_shape[0])")
    if (m.latents_mean is None) != (m.latents_std is None):
        errors.append("model.latents_mean and model.latents_std: give both (or neither)")
    if m.latents_std is not None and any(not s > 0 for s in m.latents_std):
        errors.append(f"model.latents_std={list(m.latents_std)}: every value must be > 0")
    from distill.validation.health import check_health_config

    errors += check_health_config(v.health)
    errors += _check_evaluate(v.evaluate, launcher)
    if v.guidance_scale is not None and v.guidance_scale < 0:
        errors.append(f"validation.guidance_scale={v.guidance_scale}: must be >= 0 (null: the method's)")
    if launcher.gpu_memory_gib is not None and not launcher.gpu_memory_gib > 0:
        errors.append(f"launcher.gpu_memory_gib={launcher.gpu_memory_gib}: must be > 0 (null: the local GPU's, else 80)")
    if config.logger.name.value == "wandb" and not config.logger.project:
        errors.append("logger.project is empty: wandb needs a project name")
    ckpt = config.checkpoint.resume_from
    if ckpt and not os.path.isdir(ckpt):
        errors.append(f"checkpoint.resume_from={ckpt}: no such folder")
    if d.negative_embedding and not os.path.isfile(d.negative_embedding):
        errors.append(f"data.negative_embedding={d.negative_embedding}: no such file")
    return errors


def _check_evaluate(cfg, launcher) -> List[str]:
    """validation.evaluate: its prompt file and the paths of its metrics, read before any model is built."""
    from distill.evaluation import metrics
    from distill.evaluation.prompts import PromptFileError, read_prompts

    key = "validation.evaluate"
    if cfg.every < 0:
        return [f"{key}.every={cfg.every}: must be >= 0 (0: no evaluation during training)"]
    if cfg.samples < 1:
        return [f"{key}.samples={cfg.samples}: must be >= 1"]
    if not cfg.prompts:
        return [f"{key}.prompts is empty: every={cfg.every} / watcher=true evaluate on a prompt file"] \
            if cfg.every or cfg.watcher else []
    if cfg.watcher and launcher.name.value != "slurm":
        return [f"{key}.watcher=true: a job beside the run under launcher=slurm; with launcher=local run "
                "`python -m distill.evaluate RUN --prompts FILE --watch` beside it"]
    try:
        prompts = read_prompts(Path(cfg.prompts), key=f"{key}.prompts")
    except PromptFileError as err:
        return [str(err)]
    return metrics.problems(cfg, prompts)


def world_size(launcher) -> int:
    if launcher.name == "local":
        return launcher.nproc_per_node
    return launcher.nodes * (launcher.tasks_per_node or max(launcher.gpus_per_node, 1))


def _derive_accumulation(config: Config) -> List[str]:
    """training.global_batch_size fixes grad_accum_steps; written into the config so
    that every rank and the saved config see the accumulation in use."""
    t, p = config.training, config.parallel
    if t.global_batch_size is None:
        return []
    world = world_size(config.launcher)
    dp = world // p.context if p.context >= 1 and world % p.context == 0 else world
    per_step = dp * config.data.batch_size
    key = (f"training.global_batch_size={t.global_batch_size}: {dp} data-parallel ranks x "
           f"data.batch_size={config.data.batch_size} = {per_step}")
    if t.global_batch_size < 1 or per_step < 1 or t.global_batch_size % per_step:
        return [f"{key} does not divide it"]
    accum = t.global_batch_size // per_step
    if t.grad_accum_steps not in (1, accum):
        return [f"{key}, so grad_accum_steps is {accum}, not training.grad_accum_steps={t.grad_accum_steps}"]
    t.grad_accum_steps = accum
    return []


TEXT_ENCODERS = ("family", "hash")


def _check_codecs(model, family) -> List[str]:
    """model.vae among the family's names; model.text_encoder family or hash."""
    errors = []
    if model.vae not in family.vaes:
        errors.append(f"model.vae={model.vae}: model.family={family.family} decodes with {', '.join(family.vaes)}")
    if model.text_encoder not in TEXT_ENCODERS:
        errors.append(f"model.text_encoder={model.text_encoder}: one of {', '.join(TEXT_ENCODERS)}")
    return errors


def _check_parallel(config: Config, family) -> List[str]:
    p = config.parallel
    world = world_size(config.launcher)
    errors = [f"parallel.{key}={getattr(p, key)}: must be >= 1" for key in ("replicate", "context")
              if getattr(p, key) < 1]
    if p.shard == 0 or p.shard < -1:
        errors.append(f"parallel.shard={p.shard}: must be >= 1, or -1 for the ranks left over")
    if errors:
        return errors
    if p.context != 1 and not family.supports_context_parallel:
        why = f": {family.context_parallel_note}" if family.context_parallel_note else ""
        errors.append(f"parallel.context={p.context}: model.family={family.family} has no context parallelism "
                      f"(allowed: 1){why}")
    fixed = p.replicate * p.context * (p.shard if p.shard > 0 else 1)
    if world % fixed or (p.shard > 0 and fixed != world):
        errors.append(
            f"parallel.replicate={p.replicate} x parallel.shard={p.shard} x parallel.context={p.context} "
            f"does not fit the {world} ranks of the launcher"
        )
    return errors


def _check_data(config: Config, method) -> List[str]:
    errors = []
    data = config.data
    if data.batch_size < 1:
        errors.append(f"data.batch_size={data.batch_size}: must be >= 1")
    if data.name == "synthetic" and data.num_samples < 1:
        errors.append(f"data.num_samples={data.num_samples}: must be >= 1")
    reads_data = data.name == "parquet" and not config.plan  # a memory plan reads no data
    if reads_data and not data.path:
        errors.append("data.path is null: data=parquet needs the dataset folder")
    elif reads_data and not os.path.isdir(data.path):
        errors.append(f"data.path={data.path}: no such folder")
    if data.name == "digits" and data.split not in ("train", "val"):
        errors.append(f"data.split={data.split}: allowed values are train, val")
    if data.name == "digits":
        from distill.data.digits import speeds_error

        error = speeds_error(data.speeds)
        if error:
            errors.append(error)
        if data.frames not in (1, 4):
            errors.append(f"data.frames={data.frames}: digits are clips of 4 frames, or still images (1)")
        elif data.frames != config.model.latent_shape[1]:
            errors.append(f"data.frames={data.frames} does not match model.latent_shape[1]="
                          f"{config.model.latent_shape[1]} (the frames of a sample)")
    if data.num_workers < 0:
        errors.append(f"data.num_workers={data.num_workers}: must be >= 0")
    if "latents" in method.batch_keys(config.method) and data.text_only:
        errors.append(f"data.text_only=true: method {config.method.name} with this config needs latents in the data")
    return errors
