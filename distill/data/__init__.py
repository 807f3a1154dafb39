"""Batch sources for the trainer."""

import functools
import logging
from pathlib import Path

import torch

from distill.data.parquet import DataError, ParquetIndex, ParquetLatents, Shapes, StatefulLoader
from distill.data.synthetic import SyntheticLatents
from distill.registry import family_class

# written by `python -m distill.preprocess` beside the shards: the negative
# prompt's embedding (`text_embeds` [L, D], the prompt in the metadata)
NEGATIVE_FILE = "negative_embedding.safetensors"
_warned = set()


def build_data(config, rank: int = 0, world_size: int = 1, device_type: str = "cpu"):
    """The loader a config names; datasets are checked here, before any model is built."""
    data, model = config.data, config.model
    ode = reads_ode_pairs(config)  # ODE pairs carry their own clean latents
    if ode and data.name != "parquet":  # data=digits names the prompts of the ODE pairs
        raise DataError(f"data={data.name.value}: method {config.method.name} trains on ODE pairs: data=parquet "
                        "data.path=<a folder python -m distill.ode_pairs wrote>")
    family = family_class(model.family)
    first_frame_of = functools.partial(family.first_frame_of, model)
    if data.name == "synthetic":
        return SyntheticLatents(model, data, seed=config.seed, rank=rank, world_size=world_size,
                                image_condition=image_condition(model), sample_shape=sample_shape(model),
                                first_frame_of=first_frame_of)
    if data.name == "digits":
        from distill.data.digits import ensure_digits

        path = ensure_digits(data.split, data.path, config.seed, data.speeds, data.frames) if rank == 0 else None
        if world_size > 1:
            import torch.distributed as dist

            box = [str(path) if path else None]
            dist.broadcast_object_list(box, src=0)  # the other ranks wait for rank 0 to build it
            path = box[0]
    else:
        path = data.path
    sample = sample_shape(model)
    shapes = Shapes(None if data.text_only or ode else sample, model.text_len, model.text_dim,
                    ode=sample if ode else None, image_condition=image_condition(model),
                    image_latent=family.image_latent_shape(model))
    dataset = ParquetLatents(
        ParquetIndex(str(path), shapes),
        shapes,
        batch_size=data.batch_size,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        latents_mean=_tensor_or_none(model.latents_mean),
        latents_std=_tensor_or_none(model.latents_std),
        negative_text=_negative(negative_embedding_file(data), shapes),
        shuffle_window=data.shuffle_window,
        first_frame_of=first_frame_of,
    )
    return StatefulLoader(dataset, num_workers=data.num_workers, pin_memory=device_type == "cuda")


def image_condition(model) -> str:
    """The image-conditioning columns the model family reads for this config (none,
    first_frame or concat): the family says, the data layer only reads columns."""
    return family_class(model.family).batch_condition(model)


def sample_shape(model) -> tuple:
    """A sample's latent shape as the model family lays it out (a joint family's streams
    side by side)."""
    return family_class(model.family).sample_shape(model)


def _tensor_or_none(values):
    return None if values is None else torch.tensor(list(values), dtype=torch.float32)


def negative_embedding_file(data):
    """data.negative_embedding, else the dataset's own file (parquet), else None:
    zeros, with a warning (once per dataset) for a parquet dataset."""
    if data.negative_embedding is not None or data.name != "parquet":
        return data.negative_embedding
    own = Path(data.path) / NEGATIVE_FILE
    if own.is_file():
        return str(own)
    if data.path not in _warned:
        _warned.add(data.path)
        logging.getLogger("distill").warning(
            "data.path=%s holds no %s and data.negative_embedding is null: classifier-free guidance and "
            "condition dropout use a zero embedding as the negative prompt (python -m distill.preprocess "
            "writes the model's default negative prompt)", data.path, NEGATIVE_FILE,
        )
    return None


def reads_ode_pairs(config) -> bool:
    """Whether the method trains on the teacher's ODE pairs (the `ode_trajectory` batch key)."""
    from distill.registry import method_class

    return "ode_trajectory" in method_class(config.method.name).batch_keys(config.method)


def _negative(path, shapes: Shapes):
    if path is None:
        return None
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise DataError(f"data.negative_embedding={path}: no such file")
    text = load_file(str(file)).get("text_embeds")
    if text is None or text.dim() != 2 or text.shape[1] != shapes.text_dim or text.shape[0] > shapes.text_len:
        raise DataError(
            f"data.negative_embedding={path}: needs a `text_embeds` tensor [L <= {shapes.text_len}, {shapes.text_dim}]"
        )
    padded = torch.zeros(shapes.text_len, shapes.text_dim)
    padded[: text.shape[0]] = text.float()
    return padded


__all__ = ["DataError", "SyntheticLatents", "build_data"]
