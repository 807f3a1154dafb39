"""Activation checkpointing modes (roles.<r>.activation_checkpointing): the same
gradients as none, with fewer bytes kept for the backward (full < selective < none)."""

import torch

from conftest import compose_config, run_launch
from distill.config import validate
from distill.config.schema import Checkpointing, RoleConfig
from distill.distributed import Runtime
from distill.models import build_adapter
from distill.roles import build_module


def gradients_and_kept_bytes(mode: Checkpointing):
    """One forward and backward of a tiny Wan student: its gradients, and the bytes of
    tensors alive once the forward is done (what is kept for the backward, the output
    aside), counted by the planner's live-tensor counter."""
    from distill.plan import LiveTensorBytes

    config = validate(compose_config())
    adapter = build_adapter(config.model)
    module = build_module(RoleConfig(trainable=True, activation_checkpointing=mode), None, 0, adapter, Runtime())
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *config.model.latent_shape), generator=g)
    text = torch.randn((2, config.model.text_len, config.model.text_dim), generator=g)
    with LiveTensorBytes() as live:
        out = adapter.forward(module, x, torch.tensor([300.0, 700.0]), text)
        kept = live.current - out.untyped_storage().nbytes()
    (out.float() ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}, kept


def test_selective_and_full_give_the_gradients_of_none_and_keep_less():
    reference, kept_none = gradients_and_kept_bytes(Checkpointing.none)
    kept = {}
    for mode in (Checkpointing.selective, Checkpointing.full):
        grads, kept[mode] = gradients_and_kept_bytes(mode)
        for name, grad in reference.items():
            assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-7), (mode, name)
    assert kept[Checkpointing.full] < kept[Checkpointing.selective] < kept_none, (kept, kept_none)


def test_a_config_written_with_true_or_false_reads_as_full_or_none(tmp_path):
    from distill.config.io import load_config

    file = tmp_path / "config.yaml"
    file.write_text("model: {family: wan}\nmethod: {name: dmd2}\nroles:\n  student: {trainable: true, activation_checkpointing: true}\n"
                    "  critic: {trainable: true, activation_checkpointing: false}\n")
    roles = load_config(file).roles
    assert roles["student"].activation_checkpointing == Checkpointing.full
    assert roles["critic"].activation_checkpointing == Checkpointing.none


def test_a_bool_on_the_command_line_names_the_key_and_the_modes(tmp_path):
    result = run_launch(["roles.student.activation_checkpointing=true", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode != 0
    assert "Invalid value 'True', expected one of [none, selective, full]" in result.stderr + result.stdout
    assert "roles.student.activation_checkpointing" in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()
