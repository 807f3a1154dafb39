"""Ulysses context parallelism for diffusers transformers, through diffusers' own.

diffusers (0.42) declares a context-parallel plan on its transformers
(`_cp_plan`: for Wan, the RoPE tables and the first block's input are split
on the sequence after patch embedding, and the output of `proj_out` is
gathered before unpatchify) and a Ulysses attention whose all-to-all swaps
heads and sequence, forward and backward. This module installs that on a
role's network over the run's `context` mesh dimension.

Why not `ModelMixin.enable_parallelism`: it picks its device from
`torch.accelerator` (none on a CPU, where it divides by zero) and builds its
own mesh. The three steps it takes are done here with the run's ranks:
diffusers' (ring, ulysses) mesh laid over the ranks of each context group,
the config handed to every attention processor, the plan's hooks applied.

gloo has all_to_all_single in torch 2.13 (checked; tests/test_context_parallel.py
asserts it), so the CPU runs the same exchange as NCCL.

Gradients: each rank of a context group back-propagates its own tokens, so
a parameter's gradient is a partial sum over the group (the gather before
unpatchify hands each rank its slice of the output gradient). FSDP sums them
over the group and divides by the data-parallel size (`distill.parallel.shard`).
"""

from typing import Dict

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from distill.distributed import Runtime

_configs: Dict[int, object] = {}  # id(runtime) -> diffusers ParallelConfig, built once per run


def parallel_config(runtime: Runtime):
    """diffusers' ParallelConfig for this run: Ulysses over each context group (a collective on first use)."""
    key = id(runtime)
    if key not in _configs:
        from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

        # (data, ring, ulysses): the ulysses dimension is innermost, as the run mesh's
        # context dimension is, so both group the same ranks
        mesh = init_device_mesh(runtime.device.type, (runtime.dp_size, 1, runtime.context),
                                mesh_dim_names=("data", "ring", "ulysses"))
        config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=runtime.context))
        config.setup(runtime.rank, runtime.world_size, runtime.device, mesh=mesh["ring", "ulysses"])
        _configs[key] = config
    return _configs[key]


def install(module: nn.Module, runtime: Runtime) -> nn.Module:
    """Split `module`'s sequence over the run's context groups (diffusers' plan and Ulysses attention)."""
    from diffusers.hooks.context_parallel import apply_context_parallel

    plan = getattr(module, "_cp_plan", None)
    if plan is None:
        raise ValueError(f"{type(module).__name__} declares no context-parallel plan (_cp_plan)")
    config = parallel_config(runtime)
    module._parallel_config = config
    for sub in module.modules():
        processor = getattr(sub, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(module, config.context_parallel_config, plan)
    return module


def gather_tokens(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B, tokens/cp, D] on each rank of a context group -> [B, tokens, D] on all of them
    (backward: each rank keeps its slice), so that what is computed from a block's
    features sees every token. The identity without context parallelism."""
    config = getattr(module, "_parallel_config", None)
    if config is None or config.context_parallel_config is None:
        return tokens
    from diffusers.hooks.context_parallel import EquipartitionSharder

    return EquipartitionSharder.unshard(tokens, 1, config.context_parallel_config._flattened_mesh)
