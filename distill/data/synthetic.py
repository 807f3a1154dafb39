"""Random latents and text embeddings of a model's shapes.

A stand-in for real data in plumbing runs and benchmarks: a fixed pool of
`num_samples` items drawn once from the seed, cycled in order, so a small pool
is a fixed batch a model can overfit. Ranks take turns along one stream of
sample positions, so any number of ranks sees the same global batches.
"""

from typing import Callable, Dict, Iterator, Optional

import torch


class SyntheticLatents:
    def __init__(self, model_cfg, data_cfg, seed: int, rank: int = 0, world_size: int = 1, image_condition: str = "none",
                 sample_shape=None, first_frame_of: Optional[Callable] = None):
        g = torch.Generator().manual_seed(seed + 7)
        n = data_cfg.num_samples
        self.latents = torch.randn((n, *(sample_shape or model_cfg.latent_shape)), generator=g)
        self.text = torch.randn((n, model_cfg.text_len, model_cfg.text_dim), generator=g)
        self.negative_text = torch.zeros((model_cfg.text_len, model_cfg.text_dim))
        if image_condition == "concat":
            from distill.data.parquet import DataError

            raise DataError("data=synthetic has no image embeddings for model.image_condition=concat: use data=parquet "
                            "(python -m distill.preprocess --task i2v writes them)")
        self.image_conditioned = image_condition == "first_frame"
        if first_frame_of is None:
            from distill.data.parquet import first_latent_frame as first_frame_of
        self.first_frame_of = first_frame_of
        self.batch_size = data_cfg.batch_size
        self.position = rank * self.batch_size
        self.stride = world_size * self.batch_size

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        sample_id = torch.arange(self.position, self.position + self.batch_size)
        index = sample_id % len(self.latents)
        self.position += self.stride
        batch = {
            "sample_id": sample_id,
            "latents": self.latents[index],
            "text_embeds": self.text[index],
            "negative_text_embeds": self.negative_text.expand(self.batch_size, -1, -1),
        }
        if self.image_conditioned:  # the video's own first latent frame is its image
            batch["first_frame"] = self.first_frame_of(self.latents[index])
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
