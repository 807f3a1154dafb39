"""Losses over a model family's latent streams.

A sample of most families is one latent; a joint family's sample is several
(LTX-2: video and audio, `FlowMatchingAdapter.streams`). Each stream then gets
its own mean and its own DMD normaliser, and the family's weight: a loss is
sum_s w_s * loss(stream s). With one stream both helpers are the plain
function of the whole tensor, so single-latent runs compute exactly what they
did before streams existed.
"""

from typing import Callable

import torch


def stream_loss(adapter, loss: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """sum_s w_s * loss(t_s, ...) over the adapter's streams of each tensor."""
    weights = adapter.stream_weights()
    if list(weights.values()) == [1.0]:
        return loss(*tensors)
    parts = [adapter.streams(t) for t in tensors]
    return sum(weight * loss(*(p[name] for p in parts)) for name, weight in weights.items())


def stream_map(adapter, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """fn applied to each stream of the tensors, the results joined back into one tensor."""
    weights = adapter.stream_weights()
    if len(weights) == 1:
        return fn(*tensors)
    parts = [adapter.streams(t) for t in tensors]
    return adapter.join_streams({name: fn(*(p[name] for p in parts)) for name in weights})
