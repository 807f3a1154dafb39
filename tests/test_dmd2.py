"""DMD2 against hand-computed values, with stand-in networks whose x0
predictions are fixed tensors."""

import torch
from torch import nn

from distill.config.schema import ModelConfig, RoleConfig
from distill.methods.dmd2 import DMD2, DMD2Config, Rollout, dmd_gradient, generator_loss
from distill.roles import Role, attach_optimizers
from standins import StandInAdapter

SHAPE = (1, 1, 1, 1, 4)


class FixedX0(nn.Module):
    """velocity = (x_t - target) / sigma, so that x0 = target exactly.

    target is a parameter (the student's sample) or a buffer, and may depend
    on whether the text is the conditional or the empty prompt."""

    def __init__(self, cond, uncond=None, trainable=False):
        super().__init__()
        cond = torch.as_tensor(cond, dtype=torch.float32).reshape(SHAPE)
        self.cond = nn.Parameter(cond) if trainable else nn.Parameter(cond, requires_grad=False)
        self.register_buffer("uncond", cond.clone() if uncond is None else torch.as_tensor(uncond).reshape(SHAPE).float())

    def forward(self, x_t, timestep, text):
        is_cond = (text.abs().sum(dim=(1, 2)) > 0).reshape(-1, 1, 1, 1, 1)
        target = torch.where(is_cond, self.cond, self.uncond)
        return (x_t - target) / (timestep / 1000).reshape(-1, 1, 1, 1, 1)


def make_method(student_x0, critic_x0, teacher_cond, teacher_uncond, **cfg):
    cfg = DMD2Config(student_steps=[1000], warp_steps=True, guidance_scale=3.0, **cfg)
    roles = {
        "student": Role("student", RoleConfig(trainable=True), FixedX0(student_x0, trainable=True)),
        "critic": Role("critic", RoleConfig(trainable=True), FixedX0(critic_x0, trainable=True)),
        "teacher": Role("teacher", RoleConfig(trainable=False), FixedX0(teacher_cond, teacher_uncond)),
    }
    adapter = StandInAdapter(ModelConfig(shift=3.0, latent_shape=list(SHAPE[1:])))
    return DMD2(cfg, adapter, roles, seed=0, device="cpu"), roles


def batch():
    text = torch.ones(1, 2, 3)
    return {"text_embeds": text, "negative_text_embeds": torch.zeros_like(text), "sample_id": torch.tensor([0])}


def test_dmd_gradient_hand_values():
    x0 = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    fake = torch.tensor([[2.0, 2.0], [1.0, -1.0]])
    real = torch.tensor([[0.0, 4.0], [2.0, 2.0]])
    # row 0: mean|x0 - real| = (1 + 2) / 2 = 1.5 ; row 1: (2 + 2) / 2 = 2
    expected = torch.tensor([[2 / 1.5, -2 / 1.5], [-1 / 2, -3 / 2]])
    assert torch.allclose(dmd_gradient(x0, fake, real), expected)


def test_dmd_gradient_is_zero_not_nan_when_all_three_agree():
    x0 = torch.ones(1, 3)
    assert torch.equal(dmd_gradient(x0, x0, x0), torch.zeros(1, 3))


def test_generator_loss_gradient_is_dmd_gradient_over_numel():
    x0 = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    grad = torch.tensor([[0.5, -1.0, 2.0]])
    loss = generator_loss(x0, grad)
    loss.backward()
    # loss = 0.5 * mean(grad^2) = 0.5 * (0.25 + 1 + 4) / 3
    assert torch.isclose(loss, torch.tensor(0.875))
    assert torch.allclose(x0.grad, grad / 3)


def test_generator_step_gradient_through_method():
    student = [1.0, 2.0, 3.0, 4.0]
    critic = [2.0, 2.0, 2.0, 2.0]
    method, roles = make_method(student, critic, teacher_cond=[1.0, 1.0, 5.0, 5.0], teacher_uncond=[0.0, 0.0, 0.0, 0.0])
    losses, metrics = method.losses(batch(), iteration=0)
    losses["student"].backward()
    real = torch.tensor([3.0, 3.0, 15.0, 15.0])  # 0 + 3 * (cond - 0)
    x0 = torch.tensor(student)
    grad = (torch.tensor(critic) - real) / (x0 - real).abs().mean()
    got = roles["student"].module.cond.grad.flatten()
    assert torch.allclose(got, grad / 4, atol=1e-6)
    # the generator loss must not touch the critic or the teacher
    assert roles["critic"].module.cond.grad is None
    assert roles["teacher"].module.cond.grad is None


def test_critic_target_is_noise_minus_x0():
    method, roles = make_method([1.0, -1.0, 0.5, 0.0], [0.0] * 4, teacher_cond=[0.0] * 4, teacher_uncond=None)
    noises = iter([torch.zeros(SHAPE), torch.full(SHAPE, 0.5), torch.full(SHAPE, 2.0)])
    method.randn = lambda shape: next(noises)  # rollout noise, generator noise, critic noise
    sigmas = []
    sample_sigma = method.sample_sigma
    method.sample_sigma = lambda n: sigmas.append(sample_sigma(n)) or sigmas[-1]
    losses, _ = method.losses(batch(), iteration=1)  # a critic-only iteration
    assert set(losses) == {"critic"}
    sigma = sigmas[-1]
    x0 = torch.tensor([1.0, -1.0, 0.5, 0.0])
    x_c = (1 - sigma) * x0 + sigma * 2.0
    critic_v = x_c / sigma  # critic's x0 is 0: v = (x_c - 0) / sigma
    expected = ((critic_v - (2.0 - x0)) ** 2).mean()
    assert torch.allclose(losses["critic"], expected)


def test_sampled_sigmas_are_shifted_then_clamped():
    method, _ = make_method([0.0] * 4, [0.0] * 4, [0.0] * 4, None, min_timestep_ratio=0.3, max_timestep_ratio=0.8)
    method.rand = lambda n: torch.tensor([0.0, 0.1, 0.5, 0.99])
    # shift 3: 0 -> 0 (clamped to 0.3), 0.1 -> 0.25 (clamped), 0.5 -> 0.75, 0.99 -> 0.9966 (clamped to 0.8)
    assert torch.allclose(method.sample_sigma(4), torch.tensor([0.3, 0.3, 0.75, 0.8]))


def test_warped_steps_pass_through_the_shift():
    cfg = dict(student_steps=[1000, 500, 250])
    adapter = StandInAdapter(ModelConfig(shift=3.0, latent_shape=list(SHAPE[1:])))
    warped = DMD2(DMD2Config(warp_steps=True, **cfg), adapter, {}, 0, "cpu").student_sigmas
    plain = DMD2(DMD2Config(warp_steps=False, **cfg), adapter, {}, 0, "cpu").student_sigmas
    assert torch.allclose(warped, torch.tensor([1.0, 0.75, 0.5]))
    assert torch.allclose(plain, torch.tensor([1.0, 0.5, 0.25]))


class CountingStudent(FixedX0):
    calls = 0

    def forward(self, x_t, timestep, text):
        CountingStudent.calls += 1
        return super().forward(x_t, timestep, text)


def test_backward_simulation_stops_at_the_target_step():
    method, roles = make_method([0.0] * 4, [0.0] * 4, [0.0] * 4, None, rollout=Rollout.simulate)
    method.student_sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25])
    roles["student"].module = CountingStudent([0.0] * 4, trainable=True)
    for _ in range(20):
        CountingStudent.calls = 0
        metrics = {}
        method.student_sample(batch(), {}, metrics)
        assert CountingStudent.calls == metrics["student_step"] + 1


def test_data_rollout_noises_the_batch_latent_at_the_listed_step():
    method, roles = make_method([0.0] * 4, [0.0] * 4, [0.0] * 4, None, rollout=Rollout.data)
    method.student_sigmas = torch.tensor([0.5])
    seen = []
    module = roles["student"].module
    roles["student"].module = lambda x_t, t, text: seen.append((x_t.clone(), t.clone())) or module(x_t, t, text)
    roles["student"].module.parameters = module.parameters
    method.randn = lambda shape: torch.full(shape, 4.0)
    b = dict(batch(), latents=torch.full(SHAPE, 2.0))
    method.student_sample(b, {}, {})
    x_t, t = seen[0]
    assert torch.allclose(x_t, torch.full(SHAPE, 3.0))  # 0.5 * 2 + 0.5 * 4
    assert torch.allclose(t, torch.tensor([500.0]))


def test_update_schedule_over_ten_iterations(tmp_path):
    from distill.trainer import Trainer

    # a student sample away from the teacher's: a zero DMD normaliser would give an infinite loss
    method, roles = make_method([1.0] * 4, [0.0] * 4, [0.0] * 4, None, generator_update_interval=5)
    updates = method.updates_per_role(10)
    assert updates == {"student": 2, "critic": 10, "teacher": 0}
    attach_optimizers(roles, updates, lrs={"student": 1e-3, "critic": 1e-3})
    Trainer(method, roles, iter(batch, None), run_dir=tmp_path, max_steps=10).fit()  # no checkpointer
    for name, count in (("student", 2), ("critic", 10)):
        role = roles[name]
        assert role.optimizer.state[role.module.cond]["step"] == count
        assert role.scheduler.last_epoch == count


def test_update_schedule_without_the_critic_on_generator_iterations(tmp_path):
    """FastGen's DMD2: the critic steps on 4 of every 5 iterations, the student on the 5th."""
    from distill.trainer import Trainer

    method, roles = make_method([1.0] * 4, [0.0] * 4, [0.0] * 4, None, generator_update_interval=5,
                                critic_on_generator_iterations=False)
    assert method.updates_per_role(10) == {"student": 2, "critic": 8, "teacher": 0}
    assert set(method.losses(batch(), iteration=0)[0]) == {"student"}
    attach_optimizers(roles, method.updates_per_role(10), lrs={"student": 1e-3, "critic": 1e-3})
    Trainer(method, roles, iter(batch, None), run_dir=tmp_path, max_steps=10).fit()
    for name, count in (("student", 2), ("critic", 8)):
        assert roles[name].optimizer.state[roles[name].module.cond]["step"] == count


def numbered_batches(start=0):
    """Batches whose sample ids count up from `start`, one sample each."""
    position = start
    while True:
        yield dict(batch(), sample_id=torch.tensor([position]))
        position += 1


def test_a_fresh_critic_batch_is_the_next_one_and_a_fresh_sample_is_redrawn():
    """critic_sample: reuse fits the student's own sample; fresh draws a new rollout on
    the same batch (CausVid); fresh_batch on the next batch (Self-Forcing)."""
    sampled = {}
    for mode in ("reuse", "fresh", "fresh_batch"):
        method, _ = make_method([1.0] * 4, [0.0] * 4, [0.0] * 4, None, critic_sample=mode, rollout=Rollout.data)
        seen = []
        sample = method.student_sample
        method.student_sample = lambda b, cond, metrics: seen.append(int(b["sample_id"])) or sample(b, cond, metrics)
        data = numbered_batches()
        b = dict(next(data), latents=torch.zeros(SHAPE))
        losses, _ = method.step_losses(b, 0, lambda: dict(next(data), latents=torch.zeros(SHAPE)))
        assert set(losses) == {"student", "critic"}
        sampled[mode] = seen
    assert sampled == {"reuse": [0], "fresh": [0, 0], "fresh_batch": [0, 1]}


def chunked_method(**cfg):
    """A DMD2 over a block-causal layout: 21 latent frames, 3 per chunk, CausVid's steps."""
    adapter = StandInAdapter(ModelConfig(shift=8.0, latent_shape=[1, 21, 1, 1], chunk_frames=3))
    cfg = DMD2Config(student_steps=[1000, 757, 522], rollout=Rollout.data, **cfg)
    return DMD2(cfg, adapter, {}, seed=0, device="cpu")


def draw(method, ids, frames=21):
    method.noise.start(list(ids))
    return method.input_steps(len(ids), frames)


def test_per_chunk_steps_follow_causvid_with_the_clean_step():
    """CausVid draws each block's step uniformly from [1000, 757, 522, 0]: over 2,000
    samples x 7 chunks every one of the 4 indices holds 1/4 of the draws (the binomial
    standard deviation is 0.0037; the tolerance 0.015 is 4 of them), alike within a chunk."""
    method = chunked_method(student_step_draw="per_chunk", clean_step=True)
    steps = draw(method, range(2000))
    assert steps.shape == (2000, 21)
    chunks = steps.reshape(2000, 7, 3)
    assert torch.equal(chunks, chunks[:, :, :1].expand(-1, -1, 3))
    shares = torch.bincount(chunks[:, :, 0].flatten(), minlength=4).float() / chunks[:, :, 0].numel()
    assert torch.allclose(shares, torch.full((4,), 0.25), atol=0.015), shares
    # two ranks (every other sample each) draw what one rank draws
    assert torch.equal(draw(method, range(0, 2000, 2)), steps[0::2])
    assert torch.equal(draw(method, range(1, 2000, 2)), steps[1::2])


def test_per_sample_steps_follow_fastgen_without_the_clean_step():
    """FastGen's DMD2 draws one of the listed steps per sample, never t = 0."""
    method = chunked_method(student_step_draw="per_sample")
    steps = draw(method, range(3000))
    assert steps.shape == (3000,)
    shares = torch.bincount(steps, minlength=4).float() / 3000
    assert torch.allclose(shares, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]), atol=0.03), shares
    assert torch.equal(draw(method, range(1, 3000, 2)), steps[1::2])


def test_a_clean_chunk_is_the_data_latent_at_timestep_zero():
    """Index 3 (one past the listed steps) is sigma 0: the chunk enters unnoised."""
    method = chunked_method(student_step_draw="per_chunk", clean_step=True)
    seen = []
    method.roles = {"student": Role("student", RoleConfig(trainable=True),
                                    lambda x_t, t, text: seen.append((x_t, t)) or torch.zeros_like(x_t))}
    method.roles["student"].module.parameters = lambda: iter([torch.zeros(1)])
    method.randn = lambda shape: torch.full(shape, 4.0)
    method.input_steps = lambda n, frames: torch.tensor([[0] * 3 + [3] * 3 + [1] * 15])
    latents = torch.full((1, 1, 21, 1, 1), 2.0)
    metrics = {}
    method.student_sample(dict(batch(), latents=latents), {}, metrics)
    x_t, t = seen[0]
    assert torch.allclose(x_t[0, 0, :3].flatten(), torch.full((3,), 4.0))  # sigma 1: the noise
    assert torch.equal(x_t[0, 0, 3:6].flatten(), torch.full((3,), 2.0))  # sigma 0: the latent itself
    assert torch.allclose(t[0, 3:6], torch.zeros(3)) and torch.allclose(t[0, :3], torch.full((3,), 1000.0))
    assert torch.allclose(t[0, 6:], torch.full((15,), 757.0))
    assert metrics["student_step"] == (3 * 0 + 3 * 3 + 15 * 1) / 21
