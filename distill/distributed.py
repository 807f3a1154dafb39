"""The process group and the named device mesh of a run.

The ranks come from the environment: torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT, as the local launcher sets them), the
variables SLURM gives each task (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
with the master address and port the SLURM launcher exports), or none: one
process, no process group.

The mesh has three named dimensions, outermost first: replicate, shard,
context (config section `parallel`). The ranks of one context group hold
the same batch and split its tokens (context parallelism), so the data is
split by the data-parallel rank. Roles are sharded (FSDP2) over shard x
context, flattened, and replicated over replicate (HSDP when replicate > 1).
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("replicate", "shard", "context")


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Optional[DeviceMesh] = None  # None: one process, nothing sharded
    context: int = 1  # ranks per context group
    fsdp_mesh: Optional[DeviceMesh] = None  # what roles are sharded over (`sharding_mesh`)
    # host-side agreement (the stop flag every iteration) without a device synchronisation:
    # a gloo group beside NCCL; None: the default group (gloo already, or one process)
    host_group: Optional[dist.ProcessGroup] = None

    @property
    def distributed(self) -> bool:
        """A process group and a mesh: several ranks, or one that shards (parallel.shard_single_rank)."""
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: which share of the data it reads."""
        return self.rank // self.context

    @property
    def dp_size(self) -> int:
        return self.world_size // self.context

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

    def from_main(self, value):
        """Rank 0's `value` on every rank (a small picklable object: a path, a step)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_env() -> tuple:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def mesh_shape(parallel, world_size: int) -> tuple:
    """(replicate, shard, context) for this many ranks; shard=-1 takes what is left."""
    shard = parallel.shard if parallel.shard > 0 else world_size // (parallel.replicate * parallel.context)
    shape = (parallel.replicate, shard, parallel.context)
    if parallel.replicate * shard * parallel.context != world_size:
        raise ValueError(f"parallel {dict(zip(MESH_DIMS, shape))} does not fit {world_size} ranks")
    return shape


def describe_layout(parallel, nodes: int, tasks_per_node: int) -> str:
    """Which ranks run where and how they split the work (for dry runs and logs)."""
    world = nodes * tasks_per_node
    replicate, shard, context = mesh_shape(parallel, world)
    lines = [f"{world} ranks = {nodes} node(s) x {tasks_per_node} tasks; mesh replicate {replicate} x shard {shard} "
             f"x context {context}: weights sharded over {shard * context} ranks"
             + (f", replicated {replicate} times" if replicate > 1 else "")
             + f"; {world // context} data-parallel group(s) of {context} rank(s)"]
    for group in range(world // context):
        ranks = list(range(group * context, (group + 1) * context))
        where = sorted({r // tasks_per_node for r in ranks})
        lines.append(f"  data rank {group}: ranks {ranks[0]}-{ranks[-1]} on node {','.join(map(str, where))}"
                     if context > 1 else f"  data rank {group}: rank {ranks[0]} on node {where[0]}")
    return "\n".join(lines)


def init_runtime(device: str = "auto", parallel=None, timeout_s: int = 600) -> Runtime:
    rank, world_size, local_rank = rank_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if world_size == 1:
        if parallel is None or not parallel.shard_single_rank:
            return Runtime(device=dev)
        # a group of one needs no rendezvous: an in-memory store
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s))
    else:
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    shape = mesh_shape(parallel, world_size) if parallel is not None else (1, world_size, 1)
    mesh = init_device_mesh(dev.type, shape, mesh_dim_names=MESH_DIMS)
    host_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    return Runtime(rank, world_size, local_rank, dev, mesh, context=shape[2], fsdp_mesh=sharding_mesh(mesh),
                   host_group=host_group)


def sharding_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """1-D over shard x context, or 2-D (replicate, shard x context) for HSDP.

    The context ranks shard the weights too: they hold the same batch but
    back-propagate different tokens, so their gradients are partial sums that
    the reduce-scatter adds up (`distill.parallel.shard` sets the divisor)."""
    inner = mesh["shard"] if mesh["context"].size() == 1 else mesh["shard", "context"]._flatten("shard_context")
    if mesh["replicate"].size() == 1:
        return inner
    if mesh["context"].size() == 1:
        return mesh["replicate", "shard"]
    return mesh["replicate", "shard_context"]
