"""FSDP2 for the roles: each transformer block and the root sharded over the
data-parallel mesh, mixed precision per role, weights materialised shard by
shard from rank 0's copy."""

import warnings

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from distill.config.schema import Precision, RoleConfig
from distill.distributed import Runtime

DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16}

# diffusers' transformers return a reshaped (view) output; the adapters never
# modify a network's output in place, which is what FSDP2 warns about
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def mixed_precision(cfg: RoleConfig) -> MixedPrecisionPolicy:
    """Compute in the role's precision; gradients always reduce in fp32."""
    if cfg.trainable:
        return MixedPrecisionPolicy(param_dtype=DTYPES[cfg.precision], reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # a frozen role is stored at its compute precision


def shard(module: nn.Module, blocks, cfg: RoleConfig, runtime: Runtime) -> nn.Module:
    """fully_shard per block and on the root; a 2-D (replicate, shard) mesh makes it HSDP."""
    policy = mixed_precision(cfg)
    for block in blocks:
        fully_shard(block, mesh=runtime.fsdp_mesh, mp_policy=policy)
    fully_shard(module, mesh=runtime.fsdp_mesh, mp_policy=policy)
    return module


def materialise(module: nn.Module, full: dict, runtime: Runtime) -> nn.Module:
    """Allocate a sharded meta-device module's shards and fill them from rank 0's
    full state dict (`full` is empty on the other ranks). Buffers, which stay
    real on the meta device, are kept."""
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    module.to_empty(device=runtime.device)
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return module
