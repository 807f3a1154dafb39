"""Activation memory of one transformer block of a model family, forward + backward,
measured as live tensor bytes on the CPU: the constants a family's memory plan
(`activation_bytes`) is built from.

    python benchmarks/family_activations.py                  # Qwen-Image, LTX-2 and Wan, fp32 and bf16
    python benchmarks/family_activations.py --family qwen_image --tokens 2048

For each family and precision it prints, for one block at `--tokens` image tokens
(Qwen-Image adds 64 text tokens to the same stream count; LTX-2 counts its video
tokens, its audio stream riding along) and video width `--width`:
- peak: the most bytes the block adds while its forward and backward run (inputs
  and weights excluded), per token and unit of width;
- stored: of that peak, what stays after the forward for the backward;
- no-grad: of that peak, what a forward without gradient adds;
- checkpointed: per token and unit of width, what a block wrapped in activation
  checkpointing keeps after its forward (its inputs), in elements.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.checkpoint import checkpoint  # noqa: E402

from distill.config.schema import RoleConfig  # noqa: E402
from distill.models import build_adapter  # noqa: E402
from distill.plan import LiveTensorBytes  # noqa: E402
from distill.registry import family_class  # noqa: E402
from distill.roles import Role  # noqa: E402

TEXT_TOKENS = 64


def family_setup(name: str, tokens: int, width: int):
    """(adapter, a one-block network of `width`, latents [1, C, T, H, W], text [1, L, D])."""
    heads, head_dim = width // 64, 64
    if name == "qwen_image":
        side = int(round((tokens) ** 0.5)) * 2  # packed 2x2: side/2 squared tokens
        arch = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=head_dim,
                    num_attention_heads=heads, joint_attention_dim=32, axes_dims_rope=[16, 24, 24])
        cfg = family_class(name).config_class(arch=arch, latent_shape=[4, 1, side, side], text_len=TEXT_TOKENS,
                                              text_dim=32, vae="identity", text_encoder="hash")
    elif name == "ltx2":  # video tokens; the audio stream (40 latent frames) rides along
        side = int(round((tokens / 4) ** 0.5))  # 4 frames of side^2 tokens (patch 1)
        arch = dict(in_channels=8, out_channels=8, num_attention_heads=heads, attention_head_dim=head_dim,
                    cross_attention_dim=width, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
                    audio_attention_head_dim=64, audio_cross_attention_dim=128, num_layers=1, caption_channels=16)
        cfg = family_class(name).config_class(arch=arch, latent_shape=[8, 4, side, side], audio_shape=[2, 40, 4],
                                              text_len=TEXT_TOKENS, text_dim=32, vae="identity", text_encoder="hash")
    else:
        side = int(round((tokens / 4) ** 0.5)) * 2  # 4 frames of (side/2)^2 tokens
        arch = dict(patch_size=[1, 2, 2], num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                    out_channels=16, text_dim=32, freq_dim=32, ffn_dim=4 * width, num_layers=1, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
        cfg = family_class(name).config_class(arch=arch, latent_shape=[16, 4, side, side], text_len=TEXT_TOKENS,
                                              text_dim=32, vae="identity", text_encoder="hash")
    adapter = build_adapter(cfg)
    net = adapter.load(None, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, *adapter.latent_shape), generator=g)
    text = torch.randn((1, TEXT_TOKENS, 32), generator=g)
    return adapter, net, x, text


def block_inputs(adapter, net, x, text, dtype):
    """The first block's positional and keyword inputs, caught from a forward of the network."""
    caught = {}

    def catch(module, args, kwargs):
        caught["args"], caught["kwargs"] = args, kwargs

    hook = adapter.blocks(net)[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        adapter.predict_velocity(Role("r", RoleConfig(), net), x, torch.tensor([0.5]), text)
    hook.remove()
    cast = lambda t: t.detach().to(dtype).requires_grad_(True) if torch.is_tensor(t) and t.is_floating_point() else t
    return [cast(a) for a in caught["args"]], {k: cast(v) for k, v in caught["kwargs"].items()}


def measure(block, args, kwargs, mode: str) -> float:
    """Bytes the block adds: `peak` over forward + backward, `stored` after the forward,
    `nograd` peak of a forward without gradient, `checkpointed` after a checkpointed forward."""
    with LiveTensorBytes([block]) as live:
        for t in [*args, *kwargs.values()]:
            live.add(t)
        base = live.current
        if mode == "nograd":
            with torch.no_grad():
                block(*args, **kwargs)
            return live.peak - base
        if mode == "checkpointed":
            out = checkpoint(block, *args, use_reentrant=False, **kwargs)
            return live.current - base - sum(o.untyped_storage().nbytes() for o in _tensors(out))
        out = block(*args, **kwargs)
        if mode == "stored":
            return live.current - base - sum(o.untyped_storage().nbytes() for o in _tensors(out))
        loss = sum(o.float().sum() for o in _tensors(out))
        loss.backward()
        return live.peak - base


def _tensors(out):
    return [o for o in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(o)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", help="qwen_image, ltx2, wan (default: all three)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"one block, {args.tokens} image tokens + {TEXT_TOKENS} text, width {args.width}; "
          f"median of {args.repeats}")
    print(f"{'family':12s} {'dtype':6s} {'peak B/(tok*w)':>15s} {'stored':>8s} {'no-grad':>8s} {'ckpt elems':>11s}")
    for name in args.family or ["qwen_image", "ltx2", "wan"]:
        adapter, net, x, text = family_setup(name, args.tokens, args.width)
        tokens = adapter.tokens_per_sample(net)
        for dtype in (torch.float32, torch.bfloat16):
            block = adapter.blocks(net.to(dtype))[0]
            inputs = block_inputs(adapter, net, x, text, dtype)
            got = {mode: statistics.median(measure(block, *inputs, mode) for _ in range(args.repeats))
                   for mode in ("peak", "stored", "nograd", "checkpointed")}
            unit = tokens * args.width
            element = torch.finfo(dtype).bits // 8
            print(f"{name:12s} {str(dtype).split('.')[1]:6s} {got['peak'] / unit:15.1f} "
                  f"{got['stored'] / got['peak']:8.3f} {got['nograd'] / got['peak']:8.3f} "
                  f"{got['checkpointed'] / unit / element:11.2f}")


if __name__ == "__main__":
    main()
