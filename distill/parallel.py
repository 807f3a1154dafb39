"""FSDP2 for the roles: each transformer block and the root sharded over the
data-parallel mesh, mixed precision per role, weights materialised shard by
shard from rank 0's copy."""

import warnings

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

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


def offload_policy(cfg: RoleConfig, runtime: Runtime) -> OffloadPolicy:
    """roles.<r>.cpu_offload: the role's shards live in CPU memory and are copied
    to the device block by block for each forward (frozen roles only)."""
    if cfg.cpu_offload:
        return CPUOffloadPolicy(pin_memory=runtime.device.type == "cuda")
    return OffloadPolicy()


def shard(module: nn.Module, blocks, cfg: RoleConfig, runtime: Runtime, extras=()) -> nn.Module:
    """fully_shard per block, per extra module and on the root; a 2-D (replicate, shard)
    mesh makes it HSDP.

    Gradients reduce to their mean over the data-parallel ranks. FSDP divides the
    sum over all ranks by their number, which is that mean when every rank of a
    context group holds the whole gradient (the extra modules, which see gathered
    features); the network's own units hold partial sums over their tokens, so
    their sum is divided by the data-parallel size alone."""
    policy = mixed_precision(cfg)
    network_units = list(blocks) + [module]
    for unit in [*blocks, *extras, module]:
        fully_shard(unit, mesh=runtime.fsdp_mesh, mp_policy=policy, offload_policy=offload_policy(cfg, runtime))
    if runtime.context > 1:
        for unit in network_units:
            unit.set_gradient_divide_factor(float(runtime.dp_size))
            unit.set_force_sum_reduction_for_comms(True)  # sum, then divide: gloo has no PREMUL_SUM
    return module


def materialise(module: nn.Module, full: dict, runtime: Runtime, offloaded: bool = False) -> nn.Module:
    """Allocate a sharded meta-device module's shards and fill them from rank 0's
    full state dict (`full` is empty on the other ranks). Buffers, which stay
    real on the meta device, are kept on the compute device. An offloaded role's
    shards are allocated in CPU memory, where FSDP2's CPUOffloadPolicy wants them."""
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    module.to_empty(device="cpu" if offloaded else runtime.device)
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
    if offloaded:
        for sub in module.modules():
            for key, b in sub._buffers.items():
                if b is not None:
                    sub._buffers[key] = b.to(runtime.device)
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return module
