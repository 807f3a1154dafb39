"""Checkpoints with torch.distributed.checkpoint, in safetensors files.

    <run>/checkpoint-<step>/
        state/          model, optimizer and EMA tensors: DCP, each rank its shard
        ranks/rank-<r>.safetensors   that rank's RNG states and data position
        config.yaml     the resolved config
        trainer.json    step, LR schedules, optimizer hyperparameters; written last

A checkpoint is written under a temporary name and renamed once trainer.json
is in it, so a folder named checkpoint-<step> is always complete. Nothing is
read back with pickle: tensors are safetensors, the rest JSON.
"""

import json
from contextlib import contextmanager
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from distill.config.io import save_config
from distill.config.schema import Config

NAME = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "trainer.json"


class CheckpointError(RuntimeError):
    pass


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    found = []
    for path in Path(run_dir).glob("checkpoint-*"):
        match = NAME.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def fingerprint(config: Config, world_size: int) -> Dict[str, object]:
    """What a checkpoint's tensors and data positions depend on; all must match to resume."""
    items = {
        "method.name": config.method.name,
        "model.family": config.model.family.value,
        "model.arch": OmegaConf.to_container(OmegaConf.create(dict(config.model.arch))),
        "model.latent_shape": list(config.model.latent_shape),
        "model.text_dim": config.model.text_dim,
        "data.name": config.data.name.value,
        "data.batch_size": config.data.batch_size,
        "world_size": world_size,
    }
    for name, role in sorted(config.roles.items()):
        if role.trainable:
            items[f"roles.{name}.trainable"] = True
            items[f"roles.{name}.ema_decay"] = role.ema_decay is not None
    return items


class Checkpointer:
    def __init__(self, run_dir: Path, config: Config, runtime, keep_last: int):
        self.run_dir = Path(run_dir)
        self.config = config
        self.runtime = runtime
        self.keep_last = keep_last

    # --- saving --------------------------------------------------------------
    def save(self, trainer) -> Path:
        step = trainer.step
        final = self.run_dir / f"checkpoint-{step}"
        tmp = self.run_dir / f"checkpoint-{step}.tmp"
        if self.runtime.is_main:
            for stale in self.run_dir.glob("checkpoint-*.tmp"):
                shutil.rmtree(stale)  # left by a save that was killed
            (tmp / "ranks").mkdir(parents=True)
        self.runtime.barrier()
        with _single_process_quiet():
            dcp.save(
                _tensor_state(trainer.roles),
                storage_writer=HuggingFaceStorageWriter(str(tmp / "state"), save_distributed=True),
                no_dist=not self.runtime.distributed,
            )
        _save_rank_state(tmp / "ranks" / f"rank-{self.runtime.rank}.safetensors", trainer)
        self.runtime.barrier()
        if self.runtime.is_main:
            save_config(self.config, tmp / "config.yaml")
            (tmp / COMPLETE_MARKER).write_text(json.dumps(self._trainer_json(trainer), indent=1))
            tmp.rename(final)
            self._prune()
        self.runtime.barrier()
        return final

    def _trainer_json(self, trainer) -> dict:
        return {
            "step": trainer.step,
            "fingerprint": fingerprint(self.config, self.runtime.world_size),
            "schedulers": {n: r.scheduler.state_dict() for n, r in trainer.roles.items() if r.trainable},
            "param_groups": {
                n: [{k: v for k, v in g.items() if k != "params"} for g in r.optimizer.param_groups]
                for n, r in trainer.roles.items()
                if r.trainable
            },
        }

    def _prune(self) -> None:
        if self.keep_last > 0:
            for old in complete_checkpoints(self.run_dir)[: -self.keep_last]:
                shutil.rmtree(old)

    # --- loading -------------------------------------------------------------
    def load(self, path: Path, trainer) -> None:
        path = Path(path)
        meta_file = path / COMPLETE_MARKER
        if not meta_file.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER})")
        meta = json.loads(meta_file.read_text())
        self._check_compatible(path, meta["fingerprint"])
        state = _tensor_state(trainer.roles)
        with _single_process_quiet():
            dcp.load(
                state,
                storage_reader=HuggingFaceStorageReader(str(path / "state")),
                no_dist=not self.runtime.distributed,
            )
        for name, role in trainer.roles.items():
            if not role.trainable:
                continue
            optim = _unflatten_optimizer(state, name, get_optimizer_state_dict(role.module, role.optimizer))
            for group, saved in zip(optim["param_groups"], meta["param_groups"][name]):
                group.update(saved)
            set_optimizer_state_dict(role.module, role.optimizer, optim)
            role.scheduler.load_state_dict(meta["schedulers"][name])
        trainer.step = meta["step"]
        # RNG last: nothing after this may draw random numbers before training resumes
        _load_rank_state(path / "ranks" / f"rank-{self.runtime.rank}.safetensors", trainer)

    def _check_compatible(self, path: Path, saved: dict) -> None:
        current = fingerprint(self.config, self.runtime.world_size)
        diffs = [
            f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}"
            for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)
        ]
        if diffs:
            raise CheckpointError(f"checkpoint {path} does not fit this config:\n  " + "\n  ".join(diffs))


@contextmanager
def _single_process_quiet():
    """DCP warns when it runs without a process group; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _tensor_state(roles) -> Dict[str, torch.Tensor]:
    """Every trainable role's weights, optimizer moments and EMA, flat, by name."""
    state = {}
    for name, role in roles.items():
        if not role.trainable:
            continue
        for key, value in get_model_state_dict(role.module).items():
            state[f"{name}.model.{key}"] = value
        optim = get_optimizer_state_dict(role.module, role.optimizer)
        for fqn, slots in optim["state"].items():
            for slot, value in slots.items():
                state[f"{name}.optim.{fqn}.{slot}"] = value
        if role.ema is not None:
            for key, value in role.ema.state_dict().items():
                state[f"{name}.ema.{key}"] = value
    return state


def _unflatten_optimizer(state, name: str, template: dict) -> dict:
    for fqn, slots in template["state"].items():
        for slot in slots:
            slots[slot] = state[f"{name}.optim.{fqn}.{slot}"]
    return template


def _save_rank_state(file: Path, trainer) -> None:
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    for key, value in trainer.method.state_dict().items():
        tensors[f"method.{key}"] = value
    meta = {
        "python": json.dumps([py_version, py_gauss]),
        "numpy": json.dumps([np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)]),
        "data": json.dumps(trainer.data.state_dict()),
    }
    save_file(tensors, str(file), metadata=meta)


def _load_rank_state(file: Path, trainer) -> None:
    from safetensors import safe_open

    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint was written by fewer ranks")
    tensors = load_file(str(file))
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    trainer.data.load_state_dict(json.loads(meta["data"]))
    trainer.method.load_state_dict(
        {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")}
    )
    py_version, py_gauss = json.loads(meta["python"])
    random.setstate((py_version, tuple(tensors["python"].tolist()), py_gauss))
    np_kind, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
    np.random.set_state((np_kind, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def load_role_weights(checkpoint: Path, role: str, template: Dict[str, torch.Tensor], ema: bool = False):
    """Full (unsharded) weights of one role, read in a single process."""
    kind = "ema" if ema else "model"
    state = {f"{role}.{kind}.{k}": v.clone() for k, v in template.items()}
    with _single_process_quiet():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(Path(checkpoint) / "state")), no_dist=True)
    return {k[len(f"{role}.{kind}."):]: v for k, v in state.items()}
