"""The block-causal Wan: its mask by hand, earlier chunks blind to later ones,
and chunk-by-chunk generation over the KV cache equal to the masked forward."""

import torch
from diffusers import WanTransformer3DModel

from distill.models.causal_wan import CausalState, KVCache, frame_timesteps, kv_cache, make_causal

ARCH = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6, rope_max_seq_len=32)


def tiny(causal_chunk=None, seed=0):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**ARCH).eval()
    return make_causal(model, causal_chunk) if causal_chunk else model


def run(model, x, t, text):
    return model(hidden_states=x, timestep=frame_timesteps(t, x, ARCH["patch_size"]), encoder_hidden_states=text,
                 return_dict=False)[0]


def test_block_mask_by_hand():
    state = CausalState(chunk_frames=2, frames=3, tokens_per_frame=2)
    # frames 0,1 form chunk 0 (tokens 0-3), frame 2 chunk 1 (tokens 4-5)
    want = torch.tensor([[1, 1, 1, 1, 0, 0]] * 4 + [[1, 1, 1, 1, 1, 1]] * 2, dtype=torch.bool)
    assert torch.equal(state.mask(torch.device("cpu")), want)


def test_per_frame_timesteps_spread_over_their_tokens():
    x = torch.zeros(2, 16, 3, 4, 6)  # 2 x 3 = 6 tokens per frame
    t = torch.tensor([[0.0, 10.0, 20.0], [1.0, 2.0, 3.0]])
    spread = frame_timesteps(t, x, (1, 2, 2))
    assert spread.shape == (2, 18) and spread[0, :6].eq(0).all() and spread[0, 12:].eq(20).all()
    assert spread[1].tolist() == [1.0] * 6 + [2.0] * 6 + [3.0] * 6


@torch.no_grad()
def test_earlier_chunks_do_not_see_later_frames():
    torch.manual_seed(1)
    x, text, t = torch.randn(1, 16, 3, 8, 8), torch.randn(1, 8, 32), torch.tensor([500.0])
    changed = x.clone()
    changed[:, :, 2] += 1.0  # the last frame only
    causal, plain = tiny(causal_chunk=1), tiny()
    a, b = run(causal, x, t, text), run(causal, changed, t, text)
    assert torch.allclose(a[:, :, :2], b[:, :, :2], atol=1e-6)  # frames 0 and 1 did not see it
    assert (a[:, :, 2] - b[:, :, 2]).abs().max() > 1e-3
    p, q = run(plain, x, t, text), run(plain, changed, t, text)
    assert (p[:, :, 0] - q[:, :, 0]).abs().max() > 1e-3  # the control: full attention sees it


@torch.no_grad()
def test_chunk_by_chunk_with_the_cache_equals_the_masked_forward():
    """Context chunks clean (timestep 0), the current chunk noisy: one forward
    under the block mask with per-frame timesteps, against chunk by chunk."""
    torch.manual_seed(2)
    model = tiny(causal_chunk=1)
    x, text = torch.randn(2, 16, 3, 8, 8), torch.randn(2, 8, 32)
    t = torch.tensor([[0.0, 0.0, 700.0], [0.0, 0.0, 300.0]])
    whole = run(model, x, t, text)
    pieces = []
    with kv_cache(model, KVCache()) as cache:
        for frame in range(3):
            cache.frame_offset, cache.write = frame, frame < 2
            pieces.append(run(model, x[:, :, frame:frame + 1], t[:, frame], text))
    assert len(cache.keys[0]) == 2  # the two context chunks were written, the last was not
    assert torch.allclose(torch.cat(pieces, dim=2), whole, atol=1e-5)


def test_attention_settings_set_by_diffusers_reach_the_processor_that_runs():
    """The causal processor wraps diffusers' own; the backend diffusers sets on every
    block's processor is the one both the masked and the cached paths use."""
    model = tiny(causal_chunk=1)
    model.set_attention_backend("native")
    for block in model.blocks:
        causal = block.attn1.processor
        assert causal.wan is not causal and causal.wan._attention_backend == "native"
        assert causal._attention_backend == "native"


@torch.no_grad()
def test_the_block_mask_is_built_once_per_layout(monkeypatch):
    """Every layer and every call of one layout share one mask; a new layout builds its own."""
    import distill.models.causal_wan as causal_wan

    built = []
    original = causal_wan.block_mask
    monkeypatch.setattr(causal_wan, "block_mask", lambda *args: built.append(args[:3]) or original(*args))
    model = tiny(causal_chunk=1)
    text = torch.randn(1, 8, 32)
    first = run(model, torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0]), text)
    run(model, torch.randn(1, 16, 3, 8, 8), torch.tensor([700.0]), text)
    assert built == [(3, 16, 1)]  # 2 layers x 2 calls, one build
    run(model, torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), text)
    assert built == [(3, 16, 1), (2, 16, 1)]
    assert torch.isfinite(first).all()
