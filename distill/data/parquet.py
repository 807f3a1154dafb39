"""Reading parquet latent datasets (FastVideo's schema) for training.

A dataset is a folder of parquet shards. Everything that can be checked
without reading tensors is checked when the dataset opens, before training:
the folder, the shards, their columns, every row's latent and text shapes.

Order: each epoch deals a fresh permutation of the row groups (drawn from
seed + epoch) to the ranks in turn, so each rank reads a disjoint share and
reads each of its row groups once; a rank shuffles its rows within windows of
`shuffle_window` row groups, which it holds in memory. All ranks take the
same number of rows per epoch. A rank's place in that stream is the only
loader state, so a resumed run reads exactly the batches an uninterrupted run
would have. Only the needed columns are read.
"""

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.data.schema import CLIP, DTYPES, FIRST_FRAME, LATENT, ODE, ODE_SIGMAS, TEXT, decode, required_columns


class DataError(ValueError):
    """A dataset that cannot be trained on; the message names the file and row."""


def first_latent_frame(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> its first latent frame [B, C, 1, H, W]."""
    return latents[:, :, :1]


@dataclass
class Shapes:
    latent: Optional[Tuple[int, ...]]  # [C, T, H, W] the model expects; None: text-only
    text_len: int
    text_dim: int
    ode: Optional[Tuple[int, ...]] = None  # [C, T, H, W] of the ODE pairs' states; None: not read
    # image-to-video: model.image_condition and the [C, T, H, W] of the image latent
    # (first_frame_latent). first_frame reads only its first latent frame, from the
    # column where the shards have it, else the clip's; concat reads all of it and
    # the CLIP features (clip_feature)
    image_condition: str = "none"
    image_latent: Optional[Tuple[int, ...]] = None


@dataclass
class RowGroup:
    file: Path
    index: int
    first_row: int  # global index of its first row
    num_rows: int
    file_row: int  # index of its first row within the file


class ParquetIndex:
    """Where every row lives, after checking the whole folder."""

    def __init__(self, path: str, shapes: Shapes):
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"data.path={path}: no such folder")
        files = sorted(folder.glob("*.parquet"))
        if not files:
            raise DataError(f"data.path={path}: no parquet shards (*.parquet) in the folder")
        self.with_latents = shapes.latent is not None
        self.with_ode = shapes.ode is not None
        self.image = shapes.image_condition
        self.with_first_frame_column: Optional[bool] = None  # decided by the first shard
        self.with_clip = self.image == "concat"
        self.clip_shape: Optional[List[int]] = None  # every row's must be the first row's
        self.groups: List[RowGroup] = []
        self.num_rows = 0
        for file in files:
            self._add_file(file, shapes)
        if self.num_rows == 0:
            raise DataError(f"data.path={path}: the shards hold no rows")
        self._starts = torch.tensor([g.first_row for g in self.groups])

    def _add_file(self, file: Path, shapes: Shapes) -> None:
        try:
            pf = pq.ParquetFile(file)
            names = set(pf.schema_arrow.names)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"{file}: corrupt parquet shard ({err})") from None
        if self.image != "none" and self.with_first_frame_column is None:
            self.with_first_frame_column = (f"{FIRST_FRAME}_bytes" in names or not self.with_latents
                                            or self.image == "concat")
        missing = [c for c in required_columns(self.with_latents, self.with_ode) if c not in names]
        for prefix in (p for p in self.prefixes if p in (FIRST_FRAME, CLIP)):  # the image's columns
            missing += [f"{prefix}_{part}" for part in ("bytes", "shape", "dtype") if f"{prefix}_{part}" not in names]
        if missing:
            hint = " (ODE pairs come from python -m distill.ode_pairs)" if self.with_ode and ODE_SIGMAS in missing else ""
            if any(c.startswith((FIRST_FRAME, CLIP)) for c in missing):
                hint = (f" (model.image_condition={self.image} needs the image's columns: "
                        "python -m distill.preprocess --task i2v)")
            raise DataError(f"{file}: missing columns {missing}{hint}")
        columns = ["id"] + [f"{p}_{part}" for p in self.prefixes for part in ("shape", "dtype")]
        try:
            meta = pf.read(columns=columns).to_pydict()
        except Exception as err:
            raise DataError(f"{file}: corrupt parquet shard ({err})") from None
        for row, sample_id in enumerate(meta["id"]):
            self._check_row(file, row, sample_id, meta, shapes)
        file_row = 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            self.groups.append(RowGroup(file, i, self.num_rows, n, file_row))
            self.num_rows += n
            file_row += n

    @property
    def prefixes(self) -> List[str]:
        """The tensor columns read."""
        return ([TEXT] + ([LATENT] if self.with_latents else []) + ([ODE] if self.with_ode else [])
                + ([FIRST_FRAME] if self.with_first_frame_column else []) + ([CLIP] if self.with_clip else []))

    def _check_row(self, file, row, sample_id, meta, shapes: Shapes) -> None:
        where = f"{file} row {row} (id {sample_id})"
        if self.with_clip:
            clip = list(meta[f"{CLIP}_shape"][row])
            if len(clip) != 2 or 0 in clip:
                raise DataError(f"{where}: {CLIP} shape {clip} is not [tokens, dim] (model.image_condition=concat "
                                "needs the image encoder's features: a model folder with image_encoder/)")
            self.clip_shape = self.clip_shape or clip
            if clip != self.clip_shape:
                raise DataError(f"{where}: {CLIP} shape {clip} differs from the first row's {self.clip_shape}")
        for prefix in self.prefixes:
            dtype = meta[f"{prefix}_dtype"][row]
            if dtype not in DTYPES:
                raise DataError(f"{where}: {prefix}_dtype {dtype!r} is not one of {sorted(DTYPES)}")
        text = meta[f"{TEXT}_shape"][row]
        if len(text) != 2 or text[1] != shapes.text_dim:
            raise DataError(f"{where}: text embedding shape {text} does not fit model.text_dim={shapes.text_dim}")
        if text[0] > shapes.text_len:
            raise DataError(f"{where}: text embedding of {text[0]} tokens exceeds model.text_len={shapes.text_len}")
        if self.with_latents:
            latent = tuple(meta[f"{LATENT}_shape"][row])
            if len(latent) != len(shapes.latent) or latent[0] != shapes.latent[0]:
                raise DataError(
                    f"{where}: latent shape {list(latent)} does not fit the model's {shapes.latent[0]} channels"
                )
            if latent != tuple(shapes.latent):
                raise DataError(f"{where}: latent shape {list(latent)} differs from model.latent_shape={list(shapes.latent)}")
        if self.with_first_frame_column:
            image = list(meta[f"{FIRST_FRAME}_shape"][row])
            c, t, h, w = shapes.image_latent
            if self.image == "concat" and image != [c, t, h, w]:
                raise DataError(f"{where}: {FIRST_FRAME} shape {image} differs from model.latent_shape={[c, t, h, w]}")
            if len(image) != 4 or image[0] != c or image[2:] != [h, w] or image[1] < 1:
                raise DataError(f"{where}: {FIRST_FRAME} shape {image} is not [{c}, frames, {h}, {w}] "
                                "(the model's latent channels and size)")
        if self.with_ode:
            states = list(meta[f"{ODE}_shape"][row])
            if len(states) != 5 or tuple(states[1:]) != tuple(shapes.ode):
                raise DataError(f"{where}: ODE trajectory shape {states} is not [states, *model.latent_shape="
                                f"{list(shapes.ode)}]")

    def locate(self, row: int) -> Tuple[RowGroup, int]:
        g = int(torch.searchsorted(self._starts, torch.tensor(row), right=True)) - 1
        group = self.groups[g]
        return group, row - group.first_row


class ParquetLatents(IterableDataset):
    """Batches of one rank, from its stream position onwards."""

    def __init__(
        self,
        index: ParquetIndex,
        shapes: Shapes,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        latents_mean: Optional[torch.Tensor] = None,
        latents_std: Optional[torch.Tensor] = None,
        negative_text: Optional[torch.Tensor] = None,
        shuffle_window: int = 8,
        first_frame_of: Optional[Callable] = None,
    ):
        self.index = index
        # a sample's first latent frame [B, C, 1, H, W] (the model family's layout)
        self.first_frame_of = first_frame_of or first_latent_frame
        self.shapes = shapes
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_window = shuffle_window
        self._lengths: List[int] = []
        if self._epoch_length(0) < batch_size:
            raise DataError(
                f"{index.num_rows} rows in {len(index.groups)} row groups give a rank fewer rows than data.batch_size={batch_size}"
            )
        self.mean, self.std = latents_mean, latents_std
        self.negative_text = negative_text if negative_text is not None else torch.zeros(shapes.text_len, shapes.text_dim)
        self.start_batch = 0
        self._cache: "OrderedDict[Tuple[Path, int], Dict[str, list]]" = OrderedDict()
        self._epoch_rows: Dict[int, torch.Tensor] = {}

    # --- order ---------------------------------------------------------------
    def rows_of_epoch(self, epoch: int) -> torch.Tensor:
        """This rank's rows in epoch `epoch`, in reading order."""
        if epoch not in self._epoch_rows:
            self._epoch_rows = {epoch: self._draw_epoch(epoch)}
        return self._epoch_rows[epoch]

    def _draw_epoch(self, epoch: int) -> torch.Tensor:
        """Row groups permuted from seed + epoch, dealt to the ranks in turn;
        a rank's rows are shuffled within windows of `shuffle_window` groups
        and cut to the shortest rank's count, so all ranks step alike."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        groups = self.index.groups
        order = torch.randperm(len(groups), generator=g).tolist()
        dealt = [order[r :: self.world_size] for r in range(self.world_size)]
        length = min(sum(groups[i].num_rows for i in mine) for mine in dealt)
        rows = []
        mine = dealt[self.rank]
        for start in range(0, len(mine), self.shuffle_window):
            window = torch.cat([torch.arange(groups[i].num_rows) + groups[i].first_row for i in mine[start : start + self.shuffle_window]])
            rows.append(window[torch.randperm(len(window), generator=g)])
        return torch.cat(rows)[:length] if rows else torch.zeros(0, dtype=torch.long)  # no row group for this rank

    def _epoch_length(self, epoch: int) -> int:
        while len(self._lengths) <= epoch:
            self._lengths.append(len(self._draw_epoch(len(self._lengths))))
        return self._lengths[epoch]

    def rows_of_batch(self, batch: int) -> List[Tuple[int, int]]:
        """(epoch, row) of each sample in this rank's batch number `batch`."""
        out = []
        for position in range(batch * self.batch_size, (batch + 1) * self.batch_size):
            epoch = 0
            while position >= self._epoch_length(epoch):
                position -= self._epoch_length(epoch)
                epoch += 1
            out.append((epoch, int(self.rows_of_epoch(epoch)[position])))
        return out

    # --- reading -------------------------------------------------------------
    def _row_group(self, group: RowGroup) -> Dict[str, list]:
        key = (group.file, group.index)
        if key not in self._cache:
            columns = ["id"] + [f"{p}_{s}" for p in self.index.prefixes for s in ("bytes", "shape", "dtype")]
            if self.index.with_ode:
                columns.append(ODE_SIGMAS)
            self._cache[key] = pq.ParquetFile(group.file).read_row_group(group.index, columns=columns).to_pydict()
            while len(self._cache) > self.shuffle_window:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def read_row(self, row: int) -> Dict[str, torch.Tensor]:
        group, offset = self.index.locate(row)
        data = self._row_group(group)
        where = f"{group.file} row {group.file_row + offset} (id {data['id'][offset]})"
        prefixes = {"text": TEXT, **({"latent": LATENT} if self.shapes.latent is not None else {}),
                    **({"ode": ODE} if self.index.with_ode else {}),
                    **({"image_latent": FIRST_FRAME} if self.index.with_first_frame_column else {}),
                    **({"clip": CLIP} if self.index.with_clip else {})}
        sample = {}
        for name, prefix in prefixes.items():
            try:
                sample[name] = decode(*(data[f"{prefix}_{s}"][offset] for s in ("bytes", "shape", "dtype"))).float()
            except (ValueError, RuntimeError) as err:  # bytes that do not fill the stated shape
                raise DataError(f"{where}: {prefix} cannot be decoded ({err})") from None
            if not torch.isfinite(sample[name]).all():
                raise DataError(f"{where}: {name} holds NaN or inf")
        if self.index.with_ode:
            sample["ode_sigmas"] = torch.tensor(data[ODE_SIGMAS][offset], dtype=torch.float32)
            if len(sample["ode_sigmas"]) != sample["ode"].shape[0] - 1:
                raise DataError(f"{where}: {len(sample['ode_sigmas'])} ODE sigmas for {sample['ode'].shape[0]} states "
                                "(needs one fewer: the last state is the clean end)")
        return sample

    def captions(self, rows: List[int]) -> List[str]:
        """Each row's caption (its id where the shard has no caption column)."""
        out = []
        for row in rows:
            group, offset = self.index.locate(row)
            shard = pq.ParquetFile(group.file)
            column = "caption" if "caption" in shard.schema_arrow.names else "id"
            out.append(str(shard.read_row_group(group.index, columns=[column]).column(column)[offset].as_py()))
        return out

    def make_batch(self, batch: int) -> Dict[str, torch.Tensor]:
        texts, masks, latents, ids, odes, ode_sigmas, images, clips = [], [], [], [], [], [], [], []
        for epoch, row in self.rows_of_batch(batch):
            sample = self.read_row(row)
            text = sample["text"]
            padded = torch.zeros(self.shapes.text_len, self.shapes.text_dim)
            padded[: text.shape[0]] = text
            mask = torch.zeros(self.shapes.text_len, dtype=torch.bool)
            mask[: text.shape[0]] = True
            texts.append(padded)
            masks.append(mask)
            ids.append(epoch * self.index.num_rows + row)  # unique per draw: seeds the sample's noise
            if "latent" in sample:
                latents.append(self._normalise(sample["latent"]))
            if "image_latent" in sample:
                images.append(self._normalise(sample["image_latent"]))
            if "clip" in sample:
                clips.append(sample["clip"])
            if "ode" in sample:  # stored in model space: not normalised again
                odes.append(sample["ode"])
                ode_sigmas.append(sample["ode_sigmas"])
        out = {
            "sample_id": torch.tensor(ids),
            "text_embeds": torch.stack(texts),
            "text_mask": torch.stack(masks),
            "negative_text_embeds": self.negative_text.expand(len(texts), -1, -1).clone(),
        }
        if latents:
            out["latents"] = torch.stack(latents)
        if self.shapes.image_condition == "first_frame":  # the image's own latent frame
            out["first_frame"] = self.first_frame_of(torch.stack(images) if images else out["latents"]).clone()
        elif self.shapes.image_condition == "concat":
            out["image_latent"], out["image_embeds"] = torch.stack(images), torch.stack(clips)
        if odes:
            out["ode_trajectory"], out["ode_sigmas"] = torch.stack(odes), torch.stack(ode_sigmas)
        return out

    def _normalise(self, latent: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return latent
        shape = (-1,) + (1,) * (latent.dim() - 1)
        return (latent - self.mean.reshape(shape)) / self.std.reshape(shape)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batch = self.start_batch + worker
        while True:  # workers take turns, so the loader yields batches in order
            yield self.make_batch(batch)
            batch += workers


class StatefulLoader:
    """Iterates a ParquetLatents through a DataLoader; its state is the number
    of batches handed out, so resuming restarts the workers exactly there."""

    def __init__(self, dataset: ParquetLatents, num_workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.batches_seen = 0
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._iterator is None:
            self.dataset.start_batch = self.batches_seen
            loader = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=False,
            )
            self._iterator = iter(loader)
        batch = next(self._iterator)
        self.batches_seen += 1
        return batch

    def state_dict(self) -> dict:
        return {"batches_seen": self.batches_seen}

    def load_state_dict(self, state: dict) -> None:
        self.batches_seen = int(state["batches_seen"])
        self._iterator = None
