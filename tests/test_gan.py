"""DMD2's GAN term: hand values, where its gradients go, and exact resume."""

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import compose_config
from distill.config import validate
from distill.config.schema import ModelConfig, RoleConfig
from distill.methods.dmd2 import DMD2, DMD2Config
from distill.methods.gan import GanConfig, GanHead, approximate_r1, discriminator_loss, generator_gan_loss
from distill.roles import Role
from distill.run import build_trainer, train
from standins import StandInAdapter

SHAPE = (1, 1, 1, 1, 4)  # one sample of 4 tokens


def softplus(x):
    return math.log1p(math.exp(x))


def test_loss_functions_hand_values():
    real, fake = torch.tensor([0.0, 1.0]), torch.tensor([0.0, -1.0])
    assert discriminator_loss(real, fake).item() == pytest.approx((softplus(0) + softplus(-1)) / 2 * 2)
    assert generator_gan_loss(fake).item() == pytest.approx((softplus(0) + softplus(1)) / 2)
    assert approximate_r1(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])).item() == pytest.approx(0.125)


def known_head() -> GanHead:
    """hidden 2, 1 block, MLP width 1: a token with features (a, b), a > b, scores
    2 * silu(1) + 0.5; one with a < b scores 2 * silu(-1) + 0.5 (the norm maps
    (a, b) to (1, -1) or (-1, 1))."""
    head = GanHead(hidden_size=2, num_blocks=1, head_hidden=1)
    with torch.no_grad():
        head.fc1.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.fc1.bias.zero_()
        head.fc2.weight.fill_(2.0)
        head.fc2.bias.fill_(0.5)
    return head


HIGH = 2 * (1 / (1 + math.exp(-1))) + 0.5  # 1.9621
LOW = 2 * (-1 / (1 + math.exp(1))) + 0.5  # -0.0379


def test_head_scores_each_token_and_averages():
    features = torch.tensor([[[3.0, 1.0], [0.0, 2.0], [5.0, -5.0], [1.0, 4.0]]])  # high, low, high, low
    assert known_head()([features]).item() == pytest.approx((HIGH + LOW) / 2, abs=1e-4)


class SignFeatures(nn.Module):
    def forward(self, tokens):
        return torch.cat([tokens, -tokens], dim=-1)  # (x, -x): the head sees the sign of x


class FeatureNet(nn.Module):
    """A stand-in critic: its one block's output is (x_t, -x_t) per token; velocity w * x_t."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([SignFeatures()])
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x_t, timestep, text):
        self.blocks[0](x_t.reshape(x_t.shape[0], -1, 1))
        return self.w * x_t


class FixedSample(nn.Module):
    """A student whose x0 is its parameter: velocity (x_t - x0) / sigma."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = nn.Parameter(torch.tensor(x0).reshape(SHAPE))

    def forward(self, x_t, timestep, text):
        return (x_t - self.x0) / (timestep / 1000).reshape(-1, 1, 1, 1, 1)


class FeatureAdapter(StandInAdapter):
    def blocks(self, module):
        return module.blocks

    def hidden_size(self, module):
        return 2


def gan_method(**gan):
    """Student sample -1 everywhere, real latents +1; sigma clamped to ~0, so x_t = x0."""
    cfg = DMD2Config(student_steps=[1000], guidance_scale=1.0, min_timestep_ratio=1e-7, max_timestep_ratio=1e-6,
                     gan=GanConfig(enabled=True, blocks=[0], **gan))
    critic = FeatureNet()
    critic.gan_head = known_head()
    roles = {
        "student": Role("student", RoleConfig(trainable=True), FixedSample([-1.0] * 4)),
        "critic": Role("critic", RoleConfig(trainable=True), critic),
        "teacher": Role("teacher", RoleConfig(trainable=False), FixedSample([0.0] * 4).requires_grad_(False)),
    }
    adapter = FeatureAdapter(ModelConfig(shift=1.0, latent_shape=list(SHAPE[1:])))
    return DMD2(cfg, adapter, roles, seed=0, device="cpu"), roles


def gan_batch():
    text = torch.ones(1, 2, 3)
    return {"text_embeds": text, "negative_text_embeds": torch.zeros_like(text), "sample_id": torch.tensor([0]),
            "latents": torch.ones(SHAPE)}


def test_gan_losses_through_the_method_on_known_features():
    method, _ = gan_method(generator_weight=0.1, discriminator_weight=0.01)
    _, metrics = method.losses(gan_batch(), iteration=0)
    # real tokens are positive (score HIGH), the student's negative (score LOW)
    assert metrics["gan/real_logit"].item() == pytest.approx(HIGH, abs=1e-4)
    assert metrics["gan/fake_logit"].item() == pytest.approx(LOW, abs=1e-4)
    assert metrics["gan/discriminator"].item() == pytest.approx(softplus(-HIGH) + softplus(LOW), abs=1e-4)
    assert metrics["gan/generator"].item() == pytest.approx(softplus(-LOW), abs=1e-4)


def test_generator_term_reaches_the_student_only_and_discriminator_term_the_head_only():
    method, roles = gan_method(generator_weight=1.0, discriminator_weight=1.0)
    losses, _ = method.losses(gan_batch(), iteration=0)
    losses["student"].backward(retain_graph=True)
    assert roles["student"].module.x0.grad is not None and roles["student"].module.x0.grad.abs().sum() > 0
    critic = roles["critic"].module
    assert all(p.grad is None for p in critic.parameters())
    roles["student"].module.zero_grad(set_to_none=True)
    losses["critic"].backward()
    assert roles["student"].module.x0.grad is None
    assert critic.gan_head.fc1.weight.grad.abs().sum() > 0


def _tiny(gan_overrides, steps=4):
    return validate(compose_config(["method.gan.enabled=true", "method.gan.blocks=[0,-1]", "method.gan.head_hidden=16",
                                    f"training.max_steps={steps}", "method.generator_update_interval=2",
                                    *gan_overrides]))


def _grads(module):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()}


@pytest.mark.parametrize("trunk_grad", [False, True])
def test_on_a_tiny_wan_the_trunk_gets_the_discriminator_gradient_only_when_asked(tmp_path, trunk_grad):
    on = build_trainer(_tiny([f"method.gan.trunk_grad={str(trunk_grad).lower()}"]), tmp_path / "on")
    off = build_trainer(validate(compose_config(["training.max_steps=4", "method.generator_update_interval=2"])),
                        tmp_path / "off")
    batch = next(on.data)
    for trainer in (on, off):
        losses, _ = trainer.method.step_losses(batch, 0)
        losses["critic"].backward()
        assert all(p.grad is None for p in trainer.roles["student"].module.parameters())
    with_gan, without = _grads(on.roles["critic"].module), _grads(off.roles["critic"].module)
    assert all(with_gan[n] is not None and with_gan[n].abs().sum() > 0 for n in with_gan if n.startswith("gan_head."))
    trunk = [n for n in without if without[n] is not None]
    same = all(torch.equal(with_gan[n], without[n]) for n in trunk)
    assert same != trunk_grad  # the flow-matching gradient alone, unless trunk_grad


def test_gan_run_resumes_exactly_and_exports_no_head(tmp_path):
    straight = train(_tiny([], steps=4), tmp_path / "straight")
    train(_tiny([], steps=2), tmp_path / "resumed")
    resumed = train(_tiny([], steps=4), tmp_path / "resumed")
    a = straight.roles["critic"].module.state_dict()
    b = resumed.roles["critic"].module.state_dict()
    assert any(k.startswith("gan_head.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    exported = load_file(tmp_path / "resumed" / "export" / "critic" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert exported and not any("gan_head" in k for k in exported)


def test_a_checkpoint_without_the_head_does_not_resume_a_gan_run(tmp_path):
    from distill.checkpoint import CheckpointError

    train(validate(compose_config(["training.max_steps=2"])), tmp_path / "plain")
    resumed = _tiny([f"checkpoint.resume_from={tmp_path / 'plain' / 'checkpoint-2'}"], steps=4)
    with pytest.raises(CheckpointError) as err:
        train(resumed, tmp_path / "gan")
    assert "method.gan: checkpoint has None, this run has [[0, -1], 16]" in str(err.value)


@pytest.mark.multiprocess
def test_two_ranks_shard_the_head_and_match_one_rank(tmp_path):
    """FSDP2 over 2 processes, the head its own shard unit: the losses of 1 rank."""
    from conftest import read_metrics, run_launch, train_here

    common = ["method.gan.enabled=true", "method.gan.blocks=[0,-1]", "method.gan.head_hidden=16",
              "method.gan.trunk_grad=true", "method.gan.r1_weight=1.0", "training.max_steps=4",
              "method.generator_update_interval=2"]
    train_here([*common, "data.batch_size=4", f"hydra.run.dir={tmp_path / 'one'}"])
    two = run_launch([*common, "data.batch_size=2", "launcher.nproc_per_node=2", f"hydra.run.dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    keys = ("loss/student", "loss/critic", "gan/generator", "gan/discriminator", "gan/r1", "grad_norm/critic")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in keys:
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-4 * abs(x[key]) + 1e-7, (x["step"], key, x[key], y[key])
