"""Checkpoints of registered stateful parts, with torch.distributed.checkpoint.

Whatever has state registers itself as a part (`Checkpointer.register`): a
name and an object with `state_dict()` / `load_state_dict()`. The
checkpointer knows nothing else about it. A part's state is a nested dict;
its tensors and its other (JSON) values are stored apart:

    <run>/<checkpoint.folder, e.g. checkpoint-<step>>/
        state/          tensors of the shared parts (the roles): DCP, each rank its shard
        ranks/rank-<r>.safetensors   tensors and JSON of the per-rank parts (RNG, data position)
        config.yaml     the resolved config
        trainer.json    step, config fingerprint, JSON values of the shared parts,
                        and the SHA-256 of every other file; written last

A checkpoint is written under a temporary name and renamed once trainer.json
is in it, so a folder with the checkpoint name is always complete. With
checkpoint.async_save, `save` returns once the state is copied to host memory
(DCP's staging); the files, then trainer.json and the rename, are written by a
background thread whose collectives run on a process group of their own (gloo),
apart from training's. One write is in flight at most: the next save, the end
of training and a preemption wait for it. A kill during the write leaves a
`.tmp` folder without trainer.json: the previous checkpoint stays the newest. Before a
run resumes, rank 0 checks the newest checkpoint's files against their
checksums; a damaged one is named, moved aside to `<name>.damaged` (nothing
is deleted), and the run resumes from the newest intact one, saying so;
unless `checkpoint.resume_from` named the damaged one, which stops the run. Parts are
loaded in the order they were registered (register the RNG last: nothing may
draw random numbers after it is restored). Nothing is read back with pickle:
tensors are safetensors, the rest JSON.
"""

import hashlib
import json
import logging
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from distill.config.io import config_text

log = logging.getLogger("distill")

COMPLETE_MARKER = "trainer.json"
DAMAGED_SUFFIX = ".damaged"
SEP = "/"  # joins nested keys; parameter names hold dots


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, run_dir: Path, cfg, runtime, fingerprint: Dict[str, Any], config=None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg  # CheckpointConfig: cadence, retention, resume, folder name
        self.runtime = runtime
        self.fingerprint = fingerprint
        # written beside the state as config.yaml; rendered once (OmegaConf's rendering costs
        # about a tenth of a small checkpoint's save)
        self.config_yaml = config_text(config) if config is not None else None
        self.parts: Dict[str, Tuple[Any, bool]] = {}
        prefix, _, suffix = cfg.folder.partition("{step}")
        self._name = re.compile(f"^{re.escape(prefix)}(\\d+){re.escape(suffix)}$")
        device = getattr(runtime, "device", torch.device("cpu"))
        self.background = cfg.async_save if cfg.async_save is not None else device.type == "cuda"
        self._writer: Optional[ThreadPoolExecutor] = None  # the background thread
        self._group = None  # its process group
        self._pending: Optional[Future] = None

    def register(self, name: str, part, per_rank: bool = False) -> None:
        """`part` is saved and loaded with the rest; per_rank: each rank keeps its own copy."""
        self.parts[name] = (part, per_rank)

    # --- where checkpoints are ------------------------------------------------
    def path(self, step: int) -> Path:
        return self.run_dir / self.cfg.folder.format(step=step)

    def complete(self) -> List[Path]:
        """Complete checkpoint folders of the run, oldest first."""
        found = []
        for path in self.run_dir.iterdir() if self.run_dir.is_dir() else []:
            match = self._name.match(path.name)
            if match and (path / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Optional[Path]:
        found = self.complete()
        return found[-1] if found else None

    def due(self, step: int) -> bool:
        return bool(self.cfg.every) and step % self.cfg.every == 0

    def resume_point(self) -> Optional[Path]:
        """The intact checkpoint this run continues from, or None (rank 0 checks
        the checksums and moves damaged ones aside; every rank gets its answer)."""
        if not self.cfg.resume_from and not self.cfg.resume:
            return None
        found = self._intact_resume_point() if self.runtime.is_main else None
        path = self.runtime.from_main(found)
        return Path(path) if path else None

    def _intact_resume_point(self) -> Optional[str]:
        if self.cfg.resume_from:
            path = Path(self.cfg.resume_from)
            if not (path / COMPLETE_MARKER).is_file():
                raise CheckpointError(f"checkpoint.resume_from={path}: not a complete checkpoint folder "
                                      f"(no {COMPLETE_MARKER})")
            problem = damage(path)
            if problem:
                raise CheckpointError(f"checkpoint.resume_from={path} is damaged: {problem}")
            return str(path)
        for path in reversed(self.complete()):
            problem = damage(path)
            if not problem:
                return str(path)
            aside = path.with_name(path.name + DAMAGED_SUFFIX)
            path.rename(aside)
            log.warning("checkpoint %s is damaged (%s); moved to %s, trying the previous checkpoint", path, problem, aside.name)
        return None

    @staticmethod
    def step_of(path: Path) -> int:
        return json.loads((Path(path) / COMPLETE_MARKER).read_text())["step"]

    # --- saving --------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Write a checkpoint of every part at `step`; in the background with
        async_save (returns once the state is staged in host memory)."""
        self.wait()
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.runtime.is_main:
            for stale in self.run_dir.glob("*.tmp"):
                if self._name.match(stale.name[: -len(".tmp")]):
                    shutil.rmtree(stale)  # left by a save that was killed
            (tmp / "ranks").mkdir(parents=True)
        self.runtime.barrier()
        shared_tensors, shared_json, rank_tensors, rank_json = {}, {}, {}, {}
        for name, (part, per_rank) in self.parts.items():
            tensors, values = _split(flatten(part.state_dict()), name)
            (rank_tensors if per_rank else shared_tensors).update(tensors)
            (rank_json if per_rank else shared_json)[name] = values
        writer = HuggingFaceStorageWriter(str(tmp / "state"), save_distributed=True)
        if not self.background:
            with _single_process_quiet():
                dcp.save(shared_tensors, storage_writer=writer, no_dist=not self.runtime.distributed)
            self._finish(None, tmp, step, rank_tensors, rank_json, shared_json)
            return final
        # staged too: the per-rank tensors, and the JSON values as they are now
        rank_tensors = {k: v.detach().to("cpu", copy=True) for k, v in rank_tensors.items()}
        rank_json, shared_json = json.loads(json.dumps(rank_json)), json.loads(json.dumps(shared_json))
        group = self._background_group()
        with _single_process_quiet():
            written = dcp.async_save(shared_tensors, storage_writer=writer, process_group=group,
                                     no_dist=not self.runtime.distributed)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._writer.submit(self._finish, written, tmp, step, rank_tensors, rank_json, shared_json)
        return final

    def _finish(self, written: Optional[Future], tmp: Path, step: int, rank_tensors, rank_json, shared_json) -> None:
        """After the shared state is written: this rank's file, then (rank 0, once
        every rank is done) config, trainer.json last, the rename, the pruning."""
        if written is not None:
            written.result()
        rank_file = tmp / "ranks" / f"rank-{self.runtime.rank}.safetensors"
        save_file({k: v.contiguous() for k, v in rank_tensors.items()}, str(rank_file),
                  metadata={"json": json.dumps(rank_json)})
        self._barrier(written is not None)
        if self.runtime.is_main:
            if self.config_yaml is not None:
                (tmp / "config.yaml").write_text(self.config_yaml)
            meta = {"step": step, "fingerprint": self.fingerprint, "parts": shared_json, "files": checksums(tmp)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(meta, indent=1))
            tmp.rename(self.path(step))
            self._prune()
        self._barrier(written is not None)

    def _background_group(self):
        """The background thread's own gloo group (DCP's async save needs a CPU
        backend, and its collectives must not interleave with training's)."""
        if self.runtime.distributed and self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _barrier(self, background: bool) -> None:
        if not self.runtime.distributed:
            return
        dist.barrier(group=self._group) if background else self.runtime.barrier()

    def wait(self) -> None:
        """Until the write in flight (if any) is complete; its error is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None

    def _prune(self) -> None:
        if self.cfg.keep_last > 0:
            for old in self.complete()[: -self.cfg.keep_last]:
                shutil.rmtree(old)

    # --- loading -------------------------------------------------------------
    def load(self, path: Path) -> int:
        """Restore every registered part from `path`; returns the checkpoint's step."""
        path = Path(path)
        meta_file = path / COMPLETE_MARKER
        if not meta_file.is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER})")
        meta = json.loads(meta_file.read_text())
        self._check_compatible(path, meta["fingerprint"])
        templates = {name: flatten(part.state_dict()) for name, (part, _) in self.parts.items()}
        shared = {}
        for name, (_, per_rank) in self.parts.items():
            if not per_rank:
                shared.update(_split(templates[name], name)[0])
        with _single_process_quiet():
            dcp.load(shared, storage_reader=HuggingFaceStorageReader(str(path / "state")),
                     no_dist=not self.runtime.distributed)
        rank_tensors, rank_json = _read_rank_file(path / "ranks" / f"rank-{self.runtime.rank}.safetensors")
        for name, (part, per_rank) in self.parts.items():
            tensors = rank_tensors if per_rank else shared
            values = (rank_json if per_rank else meta["parts"]).get(name, {})
            loaded = {key: tensors[f"{name}{SEP}{key}"] if _is_tensor(v) else values[key]
                      for key, v in templates[name].items()}
            part.load_state_dict(unflatten(loaded))
        return meta["step"]

    def _check_compatible(self, path: Path, saved: dict) -> None:
        current = self.fingerprint
        diffs = [
            f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}"
            for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)
        ]
        if diffs:
            raise CheckpointError(f"checkpoint {path} does not fit this config:\n  " + "\n  ".join(diffs))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path) -> Dict[str, str]:
    """Relative path -> SHA-256 of every file in a checkpoint folder but trainer.json."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in files}


def damage(path: Path) -> Optional[str]:
    """What is wrong with a complete checkpoint's files, or None when all match
    their checksums (checkpoints written before checksums existed pass)."""
    try:
        meta = json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, ValueError) as err:
        return f"{COMPLETE_MARKER} unreadable ({err})"
    for name, expected in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != expected:
            return f"{name} does not match its checksum"
    return None


def _is_tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}; lists and other values are leaves."""
    flat = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, full + SEP))
        else:
            flat[full] = value
    return flat


def unflatten(flat: Dict[str, Any]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(SEP)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _split(flat: Dict[str, Any], name: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Tensors (keyed `<part>/<key>`) apart from the JSON values (keyed `<key>`)."""
    tensors = {f"{name}{SEP}{k}": v for k, v in flat.items() if _is_tensor(v)}
    values = {k: v for k, v in flat.items() if not _is_tensor(v)}
    return tensors, values


def _read_rank_file(file: Path):
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint was written by fewer ranks")
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            values = json.loads(f.metadata()["json"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{file}: cannot be read ({err})") from None
    return tensors, values


@contextmanager
def _single_process_quiet():
    """DCP warns when it runs without a process group; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_complete(run_or_checkpoint: Path) -> Optional[Path]:
    """A checkpoint folder itself, or the newest complete one in a run folder
    (named by the run's own checkpoint.folder pattern)."""
    path = Path(run_or_checkpoint)
    if (path / COMPLETE_MARKER).is_file():
        return path
    from distill.config.schema import CheckpointConfig

    cfg = CheckpointConfig()
    if (path / "config.yaml").is_file():
        from omegaconf import OmegaConf

        cfg.folder = OmegaConf.select(OmegaConf.load(path / "config.yaml"), "checkpoint.folder", default=cfg.folder)
    return Checkpointer(path, cfg, runtime=None, fingerprint={}).latest()


def load_tensors(checkpoint: Path, template: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Full (unsharded) copies of the shared tensors named like `template`
    (`<part>/<key>` names), read in a single process."""
    state = {k: v.clone() for k, v in template.items()}
    with _single_process_quiet():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(Path(checkpoint) / "state")), no_dist=True)
    return state
