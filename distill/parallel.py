"""FSDP2 for the roles: each transformer block and the root sharded over the
mesh, mixed precision per role, weights materialised shard by shard."""

import torch
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from distill.config.schema import Precision, RoleConfig
from distill.distributed import Runtime

DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16}


def mixed_precision(cfg: RoleConfig) -> MixedPrecisionPolicy:
    """Compute in the role's precision; gradients always reduce in fp32."""
    if cfg.trainable:
        return MixedPrecisionPolicy(param_dtype=DTYPES[cfg.precision], reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # a frozen role is stored at its compute precision


def shard(module: nn.Module, blocks, cfg: RoleConfig, runtime: Runtime) -> nn.Module:
    # a 2-D mesh (replicate, shard) makes fully_shard do HSDP
    policy = mixed_precision(cfg)
    for block in blocks:
        fully_shard(block, mesh=runtime.mesh, mp_policy=policy)
    fully_shard(module, mesh=runtime.mesh, mp_policy=policy)
    return module


def build_sharded(adapter, path, seed: int, cfg: RoleConfig, runtime: Runtime) -> nn.Module:
    """A sharded role whose full weights only rank 0 ever holds.

    Every rank builds the architecture on the meta device (buffers stay real),
    shards it and allocates its own shard; rank 0 reads the weights through
    the adapter's normal loading path and broadcasts them shard-wise.
    """
    full = adapter.load_transformer(path, seed) if runtime.is_main else None
    with init_empty_weights(include_buffers=False):
        module = adapter.empty_transformer(path)
    if not cfg.trainable and DTYPES[cfg.precision] != torch.float32:
        module.to(DTYPES[cfg.precision])
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    shard(module, adapter.blocks(module), cfg, runtime)
    module.to_empty(device=runtime.device)
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return module
