"""A block-causal Wan (the autoregressive student of CausVid and Self-Forcing)
on diffusers' own WanTransformer3DModel and weights.

The latent frames are cut into chunks of `chunk_frames`. In self-attention a
token sees every token of its own chunk and of the chunks before it; the
cross-attention to the text is unchanged. `make_causal` installs this on a
network as an attention processor on each block's self-attention (diffusers'
WanAttnProcessor given a block mask) and a hook on its RoPE, so weights,
checkpoints and export stay diffusers' layout.

Generation chunk by chunk: with a `KVCache` switched on (`kv_cache`), the
network is called on one chunk's latents only; its tokens get their RoPE
positions at the chunk's frame offset and attend over the cached keys and
values of the chunks before it plus their own. A forward with
`cache.write = True` appends its keys and values (the pass that encodes a
finished chunk as context for the next ones). With activation checkpointing,
a block's recompute in the backward sees the cache as its forward saw it.

Timesteps may be given per frame ([B, frames]): they are spread over the
frame's tokens, as diffusers' Wan accepts per-token timesteps.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn


@dataclass
class KVCache:
    """Keys and values of the chunks generated so far, per self-attention layer."""

    frame_offset: int = 0  # latent frames before the chunk being run
    write: bool = False  # append this forward's keys and values
    keys: Dict[int, List[torch.Tensor]] = field(default_factory=dict)
    values: Dict[int, List[torch.Tensor]] = field(default_factory=dict)

    def past(self, layer: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        return self.keys.get(layer, []), self.values.get(layer, [])

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.keys.setdefault(layer, []).append(key)
        self.values.setdefault(layer, []).append(value)


@dataclass
class CausalState:
    """What the processors of one network share: the chunking and the current input's layout."""

    chunk_frames: int
    frames: int = 0  # latent frames of the current input (after patching)
    tokens_per_frame: int = 0
    cache: Optional[KVCache] = None
    # the mask of the last layout (and its key), reused by every layer and call of that
    # layout: at 81x480x832 it is 32,760^2 booleans, 1 GiB, which each layer call used to rebuild
    _mask_key: Optional[tuple] = field(default=None, repr=False)
    _mask: Optional[torch.Tensor] = field(default=None, repr=False)

    def mask(self, device: torch.device) -> torch.Tensor:
        """[tokens, tokens], True where a query token may attend a key token: same or earlier chunk."""
        key = (self.frames, self.tokens_per_frame, device)
        if key != self._mask_key:
            self._mask, self._mask_key = block_mask(self.frames, self.tokens_per_frame, self.chunk_frames, device), key
        return self._mask


def block_mask(frames: int, tokens_per_frame: int, chunk_frames: int, device: torch.device) -> torch.Tensor:
    """The block-causal mask of `frames` latent frames in chunks of `chunk_frames`."""
    chunk = torch.arange(frames, device=device).div(chunk_frames, rounding_mode="floor")
    chunk = chunk.repeat_interleave(tokens_per_frame)
    return chunk[:, None] >= chunk[None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs (the formula diffusers' processor applies)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out.type_as(x)


def _forwarded(name: str) -> property:
    """An attribute that diffusers sets on every block's processor (the attention
    backend, the context-parallel config), kept on the wrapped processor that reads it."""
    return property(lambda self: getattr(self.wan, name), lambda self, value: setattr(self.wan, name, value))


class BlockCausalAttnProcessor:
    """Wan's self-attention under the block mask, or over a KV cache while generating.
    The text cross-attention and the masked full clip run `wan`, diffusers' own
    processor of the block (held, not inherited: this module imports without diffusers,
    so that launch.py validates a config without loading it)."""

    _attention_backend = _forwarded("_attention_backend")
    _parallel_config = _forwarded("_parallel_config")

    def __init__(self, wan, state: CausalState, layer: int):
        self.wan = wan
        self.state = state
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None:  # cross-attention to the text: unchanged
            return self.wan(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        cache = self.state.cache
        if cache is None:
            return self.wan(attn, hidden_states, None, self.state.mask(hidden_states.device), rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        past_keys, past_values = cache.past(self.layer)
        out = dispatch_attention_fn(query, torch.cat([*past_keys, key], dim=1), torch.cat([*past_values, value], dim=1),
                                    attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend)
        if cache.write:
            cache.append(self.layer, key.detach(), value.detach())
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def make_causal(module: nn.Module, chunk_frames: int) -> nn.Module:
    """Install block-causal self-attention over chunks of `chunk_frames` latent frames."""
    state = CausalState(chunk_frames)
    pt, ph, pw = module.config.patch_size

    def record_layout(_, args, kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)
        _, _, t, h, w = latents.shape
        state.frames, state.tokens_per_frame = t // pt, (h // ph) * (w // pw)

    def offset_positions(rope, args, output):
        """RoPE at the chunk's frame offset: the tables of the whole clip so far, this chunk's rows."""
        cache = state.cache
        if cache is None or cache.frame_offset == 0:
            return output
        latents = args[0]
        b, c, t, h, w = latents.shape
        whole = rope.forward(latents.new_empty((1, c, cache.frame_offset + t, h, w)))
        start = (cache.frame_offset // pt) * state.tokens_per_frame
        return tuple(table[:, start:start + state.frames * state.tokens_per_frame] for table in whole)

    if getattr(module, "gradient_checkpointing", False):
        module._gradient_checkpointing_func = replaying_cache(module._gradient_checkpointing_func, state)
    module.register_forward_pre_hook(record_layout, with_kwargs=True)
    module.rope.register_forward_hook(offset_positions)
    for layer, block in enumerate(module.blocks):
        block.attn1.set_processor(BlockCausalAttnProcessor(block.attn1.processor, state, layer))
    module.causal_state = state
    return module


def replaying_cache(checkpoint_fn, state: CausalState):
    """Activation checkpointing that recomputes a block over the cache as it was:
    the backward runs after the whole rollout, when the cache holds later chunks
    too, so each checkpointed call keeps a view of the entries it saw."""

    def run(block, *args):
        cache = state.cache
        if cache is None or cache.write:
            return checkpoint_fn(block, *args)
        seen = KVCache(cache.frame_offset, False, {k: list(v) for k, v in cache.keys.items()},
                       {k: list(v) for k, v in cache.values.items()})

        def replay(*inputs):
            outer, state.cache = state.cache, seen
            try:
                return block(*inputs)
            finally:
                state.cache = outer

        return checkpoint_fn(replay, *args)

    return run


@contextmanager
def kv_cache(module: nn.Module, cache: KVCache):
    """Run `module` chunk by chunk over `cache` for the length of the block."""
    state: CausalState = module.causal_state
    state.cache = cache
    try:
        yield cache
    finally:
        state.cache = None


def frame_timesteps(timestep: torch.Tensor, latents: torch.Tensor, patch_size) -> torch.Tensor:
    """[B] stays; [B, frames] (one per patched latent frame) becomes [B, tokens]."""
    if timestep.ndim == 1:
        return timestep
    _, ph, pw = patch_size
    return timestep.repeat_interleave((latents.shape[3] // ph) * (latents.shape[4] // pw), dim=1)
