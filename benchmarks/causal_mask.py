"""The block-causal student's forward: its mask built once per layout against
rebuilt on every layer call (the code before the cache).

Runs a block-causal WanTransformer3DModel (random weights, diffusers' own
blocks) on one clip, alternating the two ways call by call so that machine
noise hits both alike, and prints the median forward times, their ratio, the
time of one mask build, and the bytes each way allocates per forward. The
mask is tokens^2 booleans: at 81x480x832 (21 latent frames of 30x52
patches) 32,760^2 = 1.0 GiB, which the rebuild allocated once per layer.

    python benchmarks/causal_mask.py [--frames 12] [--size 32] [--layers 4] [--iters 9] [--threads 2]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.models import causal_wan  # noqa: E402
from distill.models.causal_wan import block_mask, frame_timesteps, make_causal  # noqa: E402


def network(layers: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                                  out_channels=16, text_dim=64, freq_dim=64, ffn_dim=256, num_layers=layers,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    return make_causal(model.eval(), chunk_frames=3)


def rebuilt_every_call(self, device):
    """The mask as it was: a new one for every layer call."""
    return block_mask(self.frames, self.tokens_per_frame, self.chunk_frames, device)


@torch.no_grad()
def forward_seconds(model, x, t, text) -> float:
    start = time.perf_counter()
    model(hidden_states=x, timestep=frame_timesteps(t, x, (1, 2, 2)), encoder_hidden_states=text, return_dict=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = network(args.layers)
    x = torch.randn(1, 16, args.frames, args.size, args.size)
    t, text = torch.full((1, args.frames), 500.0), torch.randn(1, 8, 64)
    tokens = args.frames * (args.size // 2) ** 2
    cached_method = causal_wan.CausalState.mask
    times = {"cached": [], "rebuilt": []}
    forward_seconds(model, x, t, text)  # warm-up
    for _ in range(args.iters):
        for way in times:
            causal_wan.CausalState.mask = cached_method if way == "cached" else rebuilt_every_call
            model.causal_state._mask_key = None  # the cached way builds its mask once per forward here too
            times[way].append(forward_seconds(model, x, t, text))
    causal_wan.CausalState.mask = cached_method
    builds = []
    for _ in range(args.iters):
        start = time.perf_counter()
        block_mask(args.frames, (args.size // 2) ** 2, 3, torch.device("cpu"))
        builds.append(time.perf_counter() - start)
    cached, rebuilt = statistics.median(times["cached"]), statistics.median(times["rebuilt"])
    mask_bytes = tokens ** 2
    print(f"block-causal Wan, {args.layers} layers, {tokens} tokens (latents {args.frames}x{args.size}x{args.size}), "
          f"{args.threads} threads, {args.iters} forwards each, alternated")
    print(f"forward, mask built once:      median {cached * 1e3:.1f} ms")
    print(f"forward, mask rebuilt per layer: median {rebuilt * 1e3:.1f} ms  (ratio rebuilt / cached {rebuilt / cached:.3f})")
    print(f"one mask build: median {statistics.median(builds) * 1e3:.2f} ms, {mask_bytes / 2**20:.1f} MiB; "
          f"per forward: {mask_bytes / 2**20:.1f} MiB once against {args.layers * mask_bytes / 2**20:.1f} MiB")
    full = []
    for _ in range(3):  # 21 latent frames of 30 x 52 patches, 3 frames per chunk
        start = time.perf_counter()
        mask = block_mask(21, 30 * 52, 3, torch.device("cpu"))
        full.append(time.perf_counter() - start)
        del mask
    print(f"at 81x480x832 (32,760 tokens; Wan2.1-1.3B has 30 layers): one build {statistics.median(full):.2f} s here, "
          f"{32760 ** 2 / 2**30:.2f} GiB; once per forward against {30 * 32760 ** 2 / 2**30:.1f} GiB and "
          f"{30 * statistics.median(full):.1f} s of builds when rebuilt per layer")


if __name__ == "__main__":
    main()
