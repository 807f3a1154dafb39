"""Checks that span several config fields, run before anything is built.

Each failure raises ConfigError with a message that names the key and what
it may be, so that launch.py can print it and exit without a traceback.
"""

import json
import os
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.config.schema import Config, DMD2Config, FinetuneConfig, ModelConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


def validate(cfg: DictConfig) -> Config:
    """Resolve the composed config into typed dataclasses and check it."""
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err)) from None
    errors = (
        _check_roles(config)
        + _check_method(config.method)
        + _check_training(config)
        + _check_model(config)
    )
    if errors:
        raise ConfigError("\n".join(errors))
    return config


def _check_roles(config: Config) -> List[str]:
    method = config.method
    needed = type(method).roles
    errors = []
    for name, kind in needed.items():
        if name not in config.roles:
            errors.append(f"roles.{name} is missing: method {method.name} needs roles {sorted(needed)}")
            continue
        want_trainable = kind == "trainable"
        if config.roles[name].trainable != want_trainable:
            errors.append(
                f"roles.{name}.trainable={str(config.roles[name].trainable).lower()}: "
                f"method {method.name} needs the {name} {kind} (allowed: {str(want_trainable).lower()})"
            )
    for name in config.roles:
        if name not in needed:
            errors.append(f"roles.{name} is not used by method {method.name} (its roles: {sorted(needed)})")
    for name, role in config.roles.items():
        if not role.trainable:
            continue
        opt = role.optimizer
        if not opt.lr > 0:
            errors.append(f"roles.{name}.optimizer.lr={opt.lr}: must be > 0")
        if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
            errors.append(f"roles.{name}.optimizer.betas={list(opt.betas)}: must be two numbers in [0, 1)")
        if not role.max_grad_norm > 0:
            errors.append(f"roles.{name}.max_grad_norm={role.max_grad_norm}: must be > 0")
        if role.scheduler.warmup_steps < 0:
            errors.append(f"roles.{name}.scheduler.warmup_steps={role.scheduler.warmup_steps}: must be >= 0")
    return errors


def _check_method(method) -> List[str]:
    errors = []
    if isinstance(method, DMD2Config):
        steps = list(method.student_steps)
        if not steps:
            errors.append("method.student_steps is empty: list at least one step in (0, 1000], noisiest first")
        elif any(not 0 < s <= 1000 for s in steps):
            errors.append(f"method.student_steps={steps}: each step must be in (0, 1000]")
        elif any(a <= b for a, b in zip(steps, steps[1:])):
            errors.append(f"method.student_steps={steps}: must be strictly decreasing (noisiest first)")
        lo, hi = method.min_timestep_ratio, method.max_timestep_ratio
        if not 0.0 <= lo < hi <= 1.0:
            errors.append(
                f"method.min_timestep_ratio={lo}, method.max_timestep_ratio={hi}: "
                "need 0 <= min_timestep_ratio < max_timestep_ratio <= 1"
            )
        if method.generator_update_interval < 1:
            errors.append(f"method.generator_update_interval={method.generator_update_interval}: must be >= 1")
        if method.guidance_scale < 0:
            errors.append(f"method.guidance_scale={method.guidance_scale}: must be >= 0 (1 means no guidance)")
    if isinstance(method, FinetuneConfig) and not 0.0 <= method.condition_dropout <= 1.0:
        errors.append(f"method.condition_dropout={method.condition_dropout}: must be in [0, 1]")
    return errors


def _check_training(config: Config) -> List[str]:
    errors = []
    t = config.training
    for key in ("max_steps", "grad_accum_steps", "log_every"):
        if getattr(t, key) < 1:
            errors.append(f"training.{key}={getattr(t, key)}: must be >= 1")
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
    world = _world_size(launcher)
    if t.hsdp_replicas < 1 or world % t.hsdp_replicas:
        errors.append(f"training.hsdp_replicas={t.hsdp_replicas}: must divide the {world} ranks")
    if t.device not in ("auto", "cpu", "cuda"):
        errors.append(f"training.device={t.device}: allowed values are auto, cpu, cuda")
    if config.data.batch_size < 1:
        errors.append(f"data.batch_size={config.data.batch_size}: must be >= 1")
    data = config.data
    if data.name == "synthetic" and data.num_samples < 1:
        errors.append(f"data.num_samples={data.num_samples}: must be >= 1")
    if data.name == "parquet" and not data.path:
        errors.append("data.path is null: data=parquet needs the dataset folder")
    elif data.name == "parquet" and not os.path.isdir(data.path):
        errors.append(f"data.path={data.path}: no such folder")
    if data.name == "digits" and data.split not in ("train", "val"):
        errors.append(f"data.split={data.split}: allowed values are train, val")
    if data.num_workers < 0:
        errors.append(f"data.num_workers={data.num_workers}: must be >= 0")
    needs_latents = isinstance(config.method, FinetuneConfig) or (
        isinstance(config.method, DMD2Config) and config.method.rollout.value == "data"
    )
    if needs_latents and data.text_only:
        errors.append(f"data.text_only=true: method {config.method.name} (rollout {getattr(config.method, 'rollout', 'n/a')}) needs latents")
    return errors


def _world_size(launcher) -> int:
    if launcher.name == "local":
        return launcher.nproc_per_node
    return launcher.nodes * (launcher.tasks_per_node or max(launcher.gpus_per_node, 1))


def _check_model(config: Config) -> List[str]:
    model = config.model
    if len(model.latent_shape) != 4:
        return [f"model.latent_shape={list(model.latent_shape)}: must be [C, T, H, W]"]
    errors = []
    for name, role in config.roles.items():
        key = f"roles.{name}.path" if role.path else "model.path"
        path = role.path or model.path
        if path is None:
            if not model.arch:
                errors.append(f"{key} is null and model.arch is empty: give a model folder or an architecture")
                continue
            arch = dict(model.arch)
        else:
            arch, error = _read_transformer_config(path, model.subfolder, key)
            if error:
                errors.append(error)
                continue
        errors += _check_arch_fits(arch, model, key)
    return sorted(set(errors), key=errors.index)


def resolve_model_folder(path: str, subfolder: str) -> Optional[str]:
    """The local folder holding `<subfolder>/config.json`, or None.

    `path` is a folder, or a Hugging Face repo id whose snapshot is already in
    the local cache (nothing is downloaded while validating).
    """
    if os.path.isfile(os.path.join(path, subfolder, "config.json")):
        return path
    if os.path.isdir(path) or path.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, f"{subfolder}/config.json")
    if isinstance(cached, str):
        return os.path.dirname(os.path.dirname(cached))
    return None


def _read_transformer_config(path: str, subfolder: str, key: str):
    folder = resolve_model_folder(path, subfolder)
    if folder is None:
        return None, (
            f"{key}={path}: no model there; tried {os.path.join(path, subfolder, 'config.json')} "
            "and the Hugging Face cache (download the weights first, or point the key at a diffusers folder)"
        )
    config_file = os.path.join(folder, subfolder, "config.json")
    try:
        with open(config_file) as f:
            return json.load(f), None
    except (OSError, json.JSONDecodeError) as err:
        return None, f"{key}={path}: cannot read {config_file}: {err}"


def _check_arch_fits(arch: dict, model: ModelConfig, key: str) -> List[str]:
    errors = []
    if "text_dim" in arch and arch["text_dim"] != model.text_dim:
        errors.append(f"model.text_dim={model.text_dim} does not match text_dim={arch['text_dim']} of {key}")
    if "in_channels" in arch and arch["in_channels"] != model.latent_shape[0]:
        errors.append(
            f"model.latent_shape[0]={model.latent_shape[0]} does not match in_channels={arch['in_channels']} of {key}"
        )
    return errors
