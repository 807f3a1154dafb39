"""What the sCM tangent costs: one forward-mode JVP through a Wan transformer
(distill/jvp.py: SDPA for attention's value, its tangent written out in blocks
of queries) against the plain forward + backward every method already pays.

Runs a WanTransformer3DModel with random weights (diffusers' own blocks) on one
clip and times, alternating call by call so machine noise hits all alike:
- fwd+bwd: the forward with gradient and the backward of a mean-square loss;
- fwd (no grad): the forward alone;
- jvp: the forward-mode JVP (no gradient), tangents on the input and the timestep;
- math jvp: forward-mode AD through SDPA's math backend (the reference; it holds
  the whole [tokens x tokens] matrix and its tangent at once).
It prints the medians, the ratios to fwd+bwd, and the peak bytes of the tensors
each creates (the memory plan's tracker, distill/plan.py: weights not counted).

    python benchmarks/jvp_cost.py [--frames 4] [--size 32] [--layers 4] [--iters 7] [--threads 2] [--workspace-mib N]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import distill.jvp as jvp_module  # noqa: E402
from distill.jvp import jvp  # noqa: E402
from distill.plan import LiveTensorBytes  # noqa: E402


def network(layers: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                                 out_channels=16, text_dim=64, freq_dim=64, ffn_dim=256, num_layers=layers,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                 rope_max_seq_len=64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workspace-mib", type=int, help="attention's tangent workspace (distill/jvp.py; 1024)")
    args = parser.parse_args()
    if args.workspace_mib:
        jvp_module.ATTENTION_WORKSPACE_BYTES = args.workspace_mib << 20
    torch.set_num_threads(args.threads)
    model = network(args.layers)
    x = torch.randn(1, 16, args.frames, args.size, args.size)
    t, text = torch.tensor([500.0]), torch.randn(1, 8, 64)
    dx, dt = torch.randn_like(x), torch.tensor([30.0])
    f = lambda a, b: model(a, b, text, return_dict=False)[0]

    def forward_backward():
        f(x, t).pow(2).mean().backward()

    def forward():
        with torch.no_grad():
            f(x, t)

    def ours():
        jvp(f, (x, t), (dx, dt))

    def math():
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), fwAD.dual_level():
            fwAD.unpack_dual(f(fwAD.make_dual(x, dx), fwAD.make_dual(t, dt)))

    cases = {"fwd+bwd": forward_backward, "fwd (no grad)": forward, "jvp": ours, "math jvp": math}
    times = {name: [] for name in cases}
    for name, case in cases.items():  # warm up
        case()
    for _ in range(args.iters):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    tokens = args.frames * (args.size // 2) ** 2
    print(f"Wan transformer, {args.layers} layers, hidden 128, {tokens} tokens, {args.threads} threads, "
          f"median of {args.iters}")
    base = statistics.median(times["fwd+bwd"])
    for name, case in cases.items():
        with LiveTensorBytes() as live:
            case()
        model.zero_grad(set_to_none=True)
        median = statistics.median(times[name])
        print(f"{name:<16}{median * 1000:>9.1f} ms  x{median / base:.2f} of fwd+bwd   peak {live.peak / 2**20:>7.1f} MiB")


if __name__ == "__main__":
    main()
