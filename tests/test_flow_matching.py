"""The adapter's flow-matching conventions against hand-computed values."""

import torch
from torch import nn

from distill.config.schema import ModelConfig, RoleConfig
from distill.roles import Role
from standins import StandInAdapter


class Affine(nn.Module):
    """velocity = a * x_t + mean of the text: outputs known by hand."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))

    def forward(self, x_t, timestep, text):
        return self.a * x_t + text.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)


def adapter(shift=3.0):
    return StandInAdapter(ModelConfig(shift=shift, latent_shape=[1, 1, 1, 2]))


def test_shift_matches_formula_and_fixes_endpoints():
    a = adapter(shift=3.0)
    sigma = torch.tensor([0.0, 0.5, 1.0, 0.25])
    # 3 * 0.5 / (1 + 2 * 0.5) = 0.75 ; 3 * 0.25 / (1 + 2 * 0.25) = 0.5
    assert torch.allclose(a.shift_sigma(sigma), torch.tensor([0.0, 0.75, 1.0, 0.5]))
    assert torch.allclose(adapter(shift=1.0).shift_sigma(sigma), sigma)


def test_add_noise_is_per_sample_interpolation():
    a = adapter()
    x0 = torch.tensor([2.0, 4.0]).reshape(2, 1, 1, 1, 1)
    noise = torch.tensor([10.0, -6.0]).reshape(2, 1, 1, 1, 1)
    x_t = a.add_noise(x0, noise, torch.tensor([0.25, 0.5]))
    # 0.75 * 2 + 0.25 * 10 = 4 ; 0.5 * 4 + 0.5 * -6 = -1
    assert torch.allclose(x_t.flatten(), torch.tensor([4.0, -1.0]))
    assert torch.allclose(a.velocity_target(x0, noise).flatten(), torch.tensor([8.0, -10.0]))


def test_predict_x0_and_timestep_scale():
    a = adapter()
    role = Role("r", RoleConfig(), Affine(0.5))
    x_t = torch.full((1, 1, 1, 1, 2), 4.0)
    text = torch.full((1, 3, 2), 1.0)
    sigma = torch.tensor([0.5])
    v = a.predict_velocity(role, x_t, sigma, text)
    assert torch.allclose(v, torch.full_like(x_t, 3.0))  # 0.5 * 4 + 1
    assert torch.allclose(a.last_timestep, torch.tensor([500.0]))
    assert torch.allclose(a.predict_x0(role, x_t, sigma, text), torch.full_like(x_t, 2.5))  # 4 - 0.5 * 3


def test_cfg_is_uncond_plus_scale_times_difference():
    a = adapter()
    role = Role("r", RoleConfig(), Affine(0.0))
    x_t = torch.zeros(1, 1, 1, 1, 2)
    sigma = torch.tensor([1.0])
    cond, uncond = torch.full((1, 3, 2), 2.0), torch.full((1, 3, 2), 0.5)
    # x0 = x_t - sigma * v = -text_mean: cond -2, uncond -0.5; -0.5 + 4 * (-2 + 0.5) = -6.5
    guided = a.predict_x0_cfg(role, x_t, sigma, cond, uncond, scale=4.0)
    assert torch.allclose(guided, torch.full_like(x_t, -6.5))
