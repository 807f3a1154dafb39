"""The process group and device mesh of a run.

The ranks come from the environment: torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT, as the local launcher sets them), the
variables SLURM gives each task (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
with the master address and port the SLURM launcher exports), or none: one
process, no process group.
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Optional[DeviceMesh] = None  # None: one process, nothing sharded

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

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


def init_runtime(device: str = "auto", hsdp_replicas: int = 1, timeout_s: int = 600) -> Runtime:
    rank, world_size, local_rank = rank_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return Runtime(device=dev)
    dist.init_process_group(
        backend="nccl" if dev.type == "cuda" else "gloo",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    if hsdp_replicas > 1:
        mesh = init_device_mesh(
            dev.type, (hsdp_replicas, world_size // hsdp_replicas), mesh_dim_names=("replicate", "shard")
        )
    else:
        mesh = init_device_mesh(dev.type, (world_size,), mesh_dim_names=("shard",))
    return Runtime(rank, world_size, local_rank, dev, mesh)
