"""Framework overhead of one DMD2 iteration.

Times a DMD2 iteration through the trainer (config, roles, method, adapter,
logging) against a bare loop that makes the same forward and backward passes
on the same tiny Wan transformer, interleaving the two so that machine noise
hits both alike. Prints both medians and their ratio (goal: under 1.05).

    python benchmarks/step_overhead.py [--iters 200] [--threads 1]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import register_configs, validate  # noqa: E402
from distill.run import build_trainer  # noqa: E402

# one listed step and a generator update every iteration: both loops then run
# the same passes each iteration (student, critic, teacher CFG, critic again)
OVERRIDES = ["experiment=tiny", "logger=none", "validation.num_samples=1", "method.student_steps=[1000]", "method.generator_update_interval=1", "data.batch_size=2"]


def trainer_for_benchmark(run_dir):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=OVERRIDES + ["training.max_steps=1000000"])
    return build_trainer(validate(cfg), run_dir)


class BareLoop:
    """The same passes written directly against the diffusers modules."""

    def __init__(self, trainer):
        self.student = trainer.roles["student"].module
        self.critic = trainer.roles["critic"].module
        self.teacher = trainer.roles["teacher"].module
        self.opt_s = torch.optim.AdamW(self.student.parameters(), lr=2e-6, weight_decay=0.01)
        self.opt_c = torch.optim.AdamW(self.critic.parameters(), lr=2e-6, weight_decay=0.01)
        self.batch = next(trainer.data)
        self.shape = (2, *trainer.method.adapter.latent_shape)

    def net(self, module, x, sigma, text):
        return module(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=text, return_dict=False)[0]

    def step(self):
        text, uncond = self.batch["text_embeds"], self.batch["negative_text_embeds"]
        b = text.shape[0]
        ones = torch.ones(b)
        x = torch.randn(self.shape)
        x0 = x - self.net(self.student, x, ones, text)
        s = torch.rand(b).clamp(0.02, 0.98)
        sv = s.view(-1, 1, 1, 1, 1)
        with torch.no_grad():
            x_s = (1 - sv) * x0.detach() + sv * torch.randn(self.shape)
            fake = x_s - sv * self.net(self.critic, x_s, s, text)
            both = self.net(self.teacher, torch.cat([x_s, x_s]), torch.cat([s, s]), torch.cat([text, uncond]))
            real_c, real_u = (torch.cat([x_s, x_s]) - torch.cat([sv, sv]) * both).chunk(2)
            real = real_u + 4.5 * (real_c - real_u)
            grad = (fake - real) / (x0.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        loss_g = 0.5 * F.mse_loss(x0, (x0 - grad).detach())
        n = torch.randn(self.shape)
        x_c = (1 - sv) * x0.detach() + sv * n
        loss_c = F.mse_loss(self.net(self.critic, x_c, s, text), n - x0.detach())
        (loss_g + loss_c).backward()
        for module, opt in ((self.student, self.opt_s), (self.critic, self.opt_c)):
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss_g.item() + loss_c.item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = trainer_for_benchmark(run_dir)
        bare = BareLoop(trainer)
        for _ in range(10):  # warm-up
            trainer.advance()
            bare.step()
        framework, plain = [], []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            trainer.advance()
            t1 = time.perf_counter()
            bare.step()
            t2 = time.perf_counter()
            framework.append(t1 - t0)
            plain.append(t2 - t1)
        trainer.tracker.close()
    f_med, b_med = statistics.median(framework), statistics.median(plain)
    print(f"tiny Wan DMD2 iteration, batch 2, {args.iters} interleaved iterations, {args.threads} thread(s)")
    print(f"trainer median   {f_med * 1e3:8.2f} ms")
    print(f"bare loop median {b_med * 1e3:8.2f} ms")
    print(f"ratio trainer / bare: {f_med / b_med:.3f}  (overhead {100 * (f_med / b_med - 1):+.1f}%, goal < +5%)")


if __name__ == "__main__":
    main()
