"""sCM and rCM: the JVP through a tiny Wan, the sCM loss by hand, and rCM runs
(2 ranks against 1, resume, export at 1, 2 and 4 steps)."""

import math
import pytest
import torch
from diffusers import WanTransformer3DModel
from torch import nn

import distill.jvp as jvp_module
from conftest import assert_bit_identical_runs, assert_runs_match, read_metrics, run_launch, train_here
from distill.jvp import jvp
from distill.methods.consistency import AdaptiveWeight, ConsistencyTerm, ConsistencyTerms, WarmupForm

TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)


def tiny_wan_and_inputs():
    torch.manual_seed(0)
    network = WanTransformer3DModel(**TINY_WAN)
    x, text = torch.randn(2, 16, 3, 16, 16), torch.randn(2, 8, 32)
    timestep = torch.tensor([500.0, 300.0])
    return network, (x, timestep), (torch.randn_like(x), torch.tensor([30.0, 10.0])), text


@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
def test_jvp_of_a_tiny_wan_equals_a_central_difference(checkpointing):
    """fp32: the tangent against (f(x + h dx) - f(x - h dx)) / 2h at h = 1e-3 within 2e-3 of its
    norm (measured 3.5e-4; at h = 1e-2 and 3e-3 the difference falls as h^2: 8e-3, 7.5e-4)."""
    from distill.activation_checkpointing import enable
    from distill.config.schema import Checkpointing

    network, primals, tangents, text = tiny_wan_and_inputs()
    enable(network, Checkpointing(checkpointing))
    f = lambda x, t: network(x, t, text, return_dict=False)[0]
    value, tangent = jvp(f, primals, tangents)
    h = 1e-3
    with torch.no_grad():
        assert torch.equal(value, f(*primals))
        ahead = f(*(p + h * d for p, d in zip(primals, tangents)))
        behind = f(*(p - h * d for p, d in zip(primals, tangents)))
    central = (ahead - behind) / (2 * h)
    assert (tangent - central).norm() / central.norm() < 2e-3


@pytest.mark.parametrize("model", ["wan_tiny", "qwen_image_tiny", "ltx2_tiny"])
def test_jvp_through_each_familys_network_equals_a_central_difference(model):
    """The family's forward as the adapter calls it (Qwen-Image's and LTX-2's attention through
    SDPA too), tangents on the latent and on sigma: within 2e-3 of the difference's norm at
    h = 1e-3 (measured 8.0e-4, 2.9e-4, 7.3e-4)."""
    from conftest import compose_config
    from distill.config import validate
    from distill.models import build_adapter

    config = validate(compose_config([f"model={model}"]))
    adapter = build_adapter(config.model)
    network = adapter.load(None, seed=0)
    torch.manual_seed(0)
    x, sigma = torch.randn(2, *adapter.latent_shape), torch.tensor([0.5, 0.3])
    text = torch.randn(2, config.model.text_len, config.model.text_dim)
    f = lambda a, s: adapter.forward(network, a, adapter.timestep(s), text).float()
    dx, dsigma = torch.randn_like(x), torch.tensor([0.03, 0.01])
    tangent = jvp(f, (x, sigma), (dx, dsigma))[1]
    h = 1e-3
    with torch.no_grad():
        central = (f(x + h * dx, sigma + h * dsigma) - f(x - h * dx, sigma - h * dsigma)) / (2 * h)
    assert (tangent - central).norm() / central.norm() < 2e-3


def test_attention_tangent_in_blocks_equals_forward_ad_through_the_math_attention(monkeypatch):
    """The written-out tangent (in blocks of 3 queries, with a boolean mask) equals forward-mode AD
    through SDPA's math backend; the fused CPU kernel has no rule, which is why it exists."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 8, dtype=torch.float64) for _ in range(3))
    dq, dk, dv = (torch.randn_like(q) for _ in range(3))
    mask = torch.rand(10, 10) > 0.3
    mask.fill_diagonal_(True)
    monkeypatch.setattr(jvp_module, "ATTENTION_WORKSPACE_BYTES", 3 * jvp_module.WORKING_COPIES * 4 * 4 * 10)
    ours = jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), (q, k, v), (dq, dk, dv))[1]
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), fwAD.dual_level():
        out = F.scaled_dot_product_attention(*(fwAD.make_dual(a, d) for a, d in ((q, dq), (k, dk), (v, dv))),
                                             attn_mask=mask)
        reference = fwAD.unpack_dual(out).tangent
    assert torch.allclose(ours, reference.to(ours.dtype), atol=1e-5)
    # is_causal with fewer queries than keys: SDPA's own (top-left) alignment, value and tangent
    causal = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)
    value, tangent = jvp(causal, (q[..., :6, :], k, v), (dq[..., :6, :], dk, dv))
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), fwAD.dual_level():
        out = causal(*(fwAD.make_dual(a, d) for a, d in ((q[..., :6, :], dq[..., :6, :]), (k, dk), (v, dv))))
        want_value, want_tangent = fwAD.unpack_dual(out)
    assert torch.allclose(value, want_value) and torch.allclose(tangent, want_tangent.to(tangent.dtype), atol=1e-5)
    with pytest.raises(NotImplementedError), torch.no_grad(), fwAD.dual_level():  # why the mode exists
        F.scaled_dot_product_attention(fwAD.make_dual(q.float(), dq.float()), k.float(), v.float())


# --- the sCM loss on a network linear in x and t, by hand ------------------------------------------
class LinearVelocity(nn.Module):
    """v(x_s, s) = a x_s + b s, elementwise: a network linear in x and in t."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = (nn.Parameter(torch.tensor(k, dtype=torch.float64)) for k in (a, b))

    def forward(self, x, sigma):
        return self.a * x + self.b * sigma.reshape(-1, *[1] * (x.dim() - 1))


class FlowAdapter:
    """The flow-matching conventions (design.md section 3) over LinearVelocity roles."""

    def add_noise(self, x0, noise, sigma):
        s = sigma.reshape(-1, 1, 1)
        return (1 - s) * x0 + s * noise

    def predict_x0(self, role, x, sigma, text, **cond):
        return x - sigma.reshape(-1, 1, 1) * role.module(x, sigma)

    def predict_x0_cfg(self, role, x, sigma, text, uncond, scale, **cond):
        return self.predict_x0(role, x, sigma, text)  # the linear network ignores the prompt


class Role:
    def __init__(self, module):
        self.module = module


class Probe(ConsistencyTerm):
    def __init__(self, cfg, student, teacher, t, noise):
        self.cfg, self.adapter = cfg, FlowAdapter()
        self.roles = {"student": Role(student), "teacher": Role(teacher)}
        self.t, self.noise = t, noise

    def draw_trig_time(self, n):
        return self.t

    def randn(self, shape):
        return self.noise


def by_hand(x0, noise, t, a, b, c, d, r, form, norm_c):
    """Loss and d loss / d(a, b) from the closed forms. With u = 1 / (sin t + cos t),
    v = a x_s + b s gives F(x_t, t) = A(t) x_t + B(t), A = (cos - sin) u + a u^2, B = b sin u^2;
    the tangent is T = cos sin (A F_T + A' x_t + B'), A' = -1 - (cos - sin)^2 u^2 - 2a (cos - sin) u^3,
    B' = b (cos u^2 - 2 sin (cos - sin) u^3); dF/da = u^2 x_t, dF/db = sin u^2."""
    sin, cos = torch.sin(t)[:, None, None], torch.cos(t)[:, None, None]
    u = 1 / (sin + cos)
    x_t = cos * x0 + sin * noise
    A = lambda k: (cos - sin) * u + k * u ** 2
    F_student, F_teacher = A(a) * x_t + b * sin * u ** 2, A(c) * x_t + d * sin * u ** 2
    dA = -1 - (cos - sin) ** 2 * u ** 2 - 2 * a * (cos - sin) * u ** 3
    dB = b * (cos * u ** 2 - 2 * sin * (cos - sin) * u ** 3)
    T = cos * sin * (A(a) * F_teacher + dA * x_t + dB)
    if form == "scm":
        g = -cos ** 2 * (F_student - F_teacher) - r * (cos * sin * x_t + T)
    else:
        g = -cos * torch.sqrt(1 - r ** 2 * sin ** 2) * (F_student - F_teacher) - (r * cos * sin * x_t + T)
    g = g / (g.flatten(1).norm(dim=1)[:, None, None] + norm_c)
    D = x0[0].numel()
    loss = (g ** 2).flatten(1).mean(1).mean()
    # d/dtheta of mean_i ||F - sg(F) - g||^2 / D at F = sg(F): -2 / (n D) sum g dF/dtheta
    n = x0.shape[0]
    grad_a = (-2 / (n * D) * g * u ** 2 * x_t).sum()
    grad_b = (-2 / (n * D) * g * sin * u ** 2).sum()
    return loss, grad_a, grad_b


@pytest.mark.parametrize("form,r", [("scm", 0.3), ("scm", 1.0), ("rcm", 0.3)])
def test_scm_loss_of_a_linear_network_equals_the_hand_computation(form, r):
    torch.manual_seed(1)
    x0, noise = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    a, b, c, d = 0.7, -0.4, 0.2, 0.5
    cfg = ConsistencyTerms(tangent_warmup=10, warmup_form=WarmupForm(form), adaptive_weighting=False,
                           consistency_weight=1.0)
    cfg.guidance_scale = 1.0
    student = LinearVelocity(a, b).double()
    probe = Probe(cfg, student, LinearVelocity(c, d).double(), t, noise)
    loss = probe.consistency_loss(x0, None, None, {}, iteration=round(r * 10), metrics={})
    loss.backward()
    want, grad_a, grad_b = by_hand(x0, noise, t, a, b, c, d, r, form, 0.1)
    assert loss.item() == pytest.approx(want.item(), rel=1e-9)
    assert student.a.grad.item() == pytest.approx(grad_a.item(), rel=1e-9)
    assert student.b.grad.item() == pytest.approx(grad_b.item(), rel=1e-9)


def test_adaptive_weighting_weighs_each_sample_by_e_w_and_adds_minus_w():
    """mean_i e^w_i ||g_i||^2 / D - w_i, w from AdaptiveWeight (given non-zero weights)."""
    torch.manual_seed(2)
    x0, noise = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    t = torch.tensor([0.5, 1.2], dtype=torch.float64)
    cfg = ConsistencyTerms(tangent_warmup=0, adaptive_weighting=True)
    cfg.guidance_scale = 1.0
    student = LinearVelocity(0.7, -0.4).double()
    student.adaptive_weight = AdaptiveWeight().double()
    nn.init.normal_(student.adaptive_weight.linear.weight, std=0.3)
    probe = Probe(cfg, student, LinearVelocity(0.2, 0.5).double(), t, noise)
    loss = probe.consistency_loss(x0, None, None, {}, iteration=0, metrics={})
    per_sample = [by_hand(x0[i:i + 1], noise[i:i + 1], t[i:i + 1], 0.7, -0.4, 0.2, 0.5, 1.0, "scm", 0.1)[0]
                  for i in range(2)]
    w = student.adaptive_weight(t).detach()
    assert w.abs().min() > 1e-3  # the weighting is really on
    want = sum(math.exp(w[i]) * per_sample[i] - w[i] for i in range(2)) / 2
    assert loss.item() == pytest.approx(float(want), rel=1e-9)


# --- rCM runs on the tiny Wan -------------------------------------------------------------------
# 2 warmup iterations of sCM alone, then the student every 2nd iteration (sCM + DMD2) and the
# critic between; adaptive weighting on so its module shards, steps and resumes too. A learning
# rate of 1e-3, as in test_families: near-zero gradients' float reordering stays under 1e-5.
RCM = ["method=rcm", "method.tangent_warmup=2", "method.generator_update_interval=2", "method.generator_lr=1e-3",
       "method.critic_lr=1e-3", "method.adaptive_weighting=true", "validation.num_samples=2",
       "validation.health.diversity_seeds=0"]


@pytest.mark.multiprocess
def test_rcm_on_two_ranks_equals_one_and_a_resumed_run_is_bit_identical(tmp_path):
    """2 ranks (FSDP2: the JVP's tangent through sharded parameters) x batch 2 equal 1 rank x
    batch 4; 3 steps then a restart to 6 equal 6 straight, bit for bit."""
    one, resumed, two = tmp_path / "one", tmp_path / "resumed", tmp_path / "two"
    train_here([*RCM, "data.batch_size=4", "training.max_steps=6", f"hydra.run.dir={one}"])
    train_here([*RCM, "data.batch_size=4", "training.max_steps=3", f"hydra.run.dir={resumed}"])
    train_here([*RCM, "data.batch_size=4", "training.max_steps=6", f"hydra.run.dir={resumed}"])
    result = run_launch([*RCM, "data.batch_size=2", "launcher.nproc_per_node=2", "training.max_steps=6",
                         f"hydra.run.dir={two}"])
    assert result.returncode == 0, result.stderr
    assert_runs_match(two, one)
    # attention's tangent path is announced once per process, not once per call
    assert 1 <= (two / "launch.log").read_text().count("forward-mode JVP: attention runs SDPA") <= 2
    a, b, c = read_metrics(one), read_metrics(resumed), read_metrics(two)
    # the tangent's norm (through the JVP) on 2 ranks equals 1 rank's at every student step
    norms = [(x["consistency/g_norm"], z["consistency/g_norm"]) for x, z in zip(a, c) if "consistency/g_norm" in x]
    assert len(norms) == 4 and all(x == pytest.approx(z, rel=1e-5) for x, z in norms)
    # the schedule: sCM alone in the warmup, then sCM + DMD2 and the critic in turn
    assert [sorted(k for k in r if k.startswith("loss/")) for r in a] == [
        ["loss/student"], ["loss/student"], ["loss/consistency", "loss/dmd", "loss/student"], ["loss/critic"],
        ["loss/consistency", "loss/dmd", "loss/student"], ["loss/critic"]]
    assert [r["step"] for r in b] == list(range(1, 7))
    assert_bit_identical_runs(one, resumed, roles=("student", "critic"))


def test_rcm_export_samples_at_one_two_and_four_steps(tmp_path, capsys):
    """A 4-step rCM export sampled by `python -m distill.sample --steps K` (its main, here) for
    K = 1, 2, 4: K student steps on the listed sigmas' first K (as rCM samples one checkpoint at
    1 to 4), each a different clip; 4 is the export's own sampler; 5 is refused."""
    from safetensors.torch import load_file

    from distill.sample import main

    run = train_here([*RCM, "training.max_steps=3", f"hydra.run.dir={tmp_path / 'run'}"])
    export = str(run / "export" / "student")
    samples = {}
    for steps in (1, 2, 4):
        out = tmp_path / f"{steps}.safetensors"
        assert main([export, "--prompt", "a red ball", "--steps", str(steps), "--out", str(out)]) == 0
        assert f"1 samples in {steps} steps" in capsys.readouterr().out
        samples[steps] = load_file(str(out))["samples"]
        assert samples[steps].shape == (1, 16, 3, 16, 16) and torch.isfinite(samples[steps]).all()
    assert not torch.equal(samples[1], samples[2]) and not torch.equal(samples[2], samples[4])
    assert main([export, "--prompt", "x", "--steps", "5", "--out", str(tmp_path / "5.safetensors")]) != 0
    assert "4 distilled steps or the first ones of them" in capsys.readouterr().err
