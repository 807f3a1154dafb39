"""The extension contracts: a method and a model family registered from outside
the package (tests/plugins) run end to end through launch.py, on one process
and on two."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_metrics, run_launch

PLUGINS = ROOT / "tests" / "plugins"


def launch_with_plugins(args, monkeypatch):
    monkeypatch.setenv("DISTILL_PLUGINS", "distill_extras")
    monkeypatch.setenv("PYTHONPATH", f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return run_launch([f"hydra.searchpath=[file://{PLUGINS / 'conf'}]", *args])


def test_extra_method_runs_through_launch(tmp_path, monkeypatch):
    run = tmp_path / "run"
    result = launch_with_plugins(
        ["method=teacher_regression", "method.lr=1e-3", "training.max_steps=4", f"hydra.run.dir={run}"], monkeypatch
    )
    assert result.returncode == 0, result.stderr
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all("loss/student" in r and r["lr/student"] == 1e-3 for r in records)
    assert sorted(p.name for p in (run / "export").iterdir()) == ["student"]  # the teacher is frozen
    info = json.loads((run / "export" / "student" / "distill.json").read_text())
    assert info["sampler"] == {"kind": "few_step", "sigmas": [1.0, 0.5]}  # the method's own sampler
    assert (run / "samples" / "student_2step-step000004.png").is_file()  # validation asked the method
    assert (run / "samples" / "teacher_2step.png").is_file()


def test_extra_method_checks_reach_the_user(tmp_path, monkeypatch):
    result = launch_with_plugins(["method=teacher_regression", "method.student_steps=[]",
                                  f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch)
    assert result.returncode == 2 and "method.student_steps is empty" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.multiprocess
def test_extra_family_with_a_conditioning_input_runs_on_two_processes(tmp_path, monkeypatch):
    """dmd2 (data rollout) on the first-frame family: every forward of the student,
    critic and teacher receives the frame from the batch, under FSDP2 on 2 ranks."""
    run = tmp_path / "run"
    result = launch_with_plugins(
        ["model=wan_first_frame_tiny", "method.rollout=data", "training.max_steps=3", "launcher.nproc_per_node=2",
         "data.batch_size=1", f"hydra.run.dir={run}"],
        monkeypatch,
    )
    assert result.returncode == 0, result.stderr
    assert all("loss/critic" in r for r in read_metrics(run))
    weights = load_file(run / "export" / "student" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert weights["patch_embedding.weight"].shape[1] == 32  # latents + first frame
    config = json.loads((run / "export" / "student" / "transformer" / "config.json").read_text())
    assert config["in_channels"] == 32


def test_extra_family_refuses_a_model_without_room_for_the_frame(tmp_path, monkeypatch):
    result = launch_with_plugins(["model=wan_first_frame_tiny", "model.arch.in_channels=16",
                                  f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch)
    assert result.returncode == 2
    assert ("in_channels=16 of model.arch does not fit model.latent_shape[0]=16: "
            "model.family=wan_first_frame needs in_channels=32") in result.stderr


def test_forward_receives_the_conditioning_input(tmp_path):
    """In process: every network call of a DMD2 generator iteration (student, critic's
    fake score, teacher's batched CFG, critic loss) gets the batch's first frame."""
    import sys

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distill.config import validate
    from distill.run import build_trainer

    sys.path.insert(0, str(PLUGINS))
    import distill_extras  # noqa: F401  (registers the entries)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "experiment=tiny", "logger=none", f"hydra.searchpath=[file://{PLUGINS / 'conf'}]",
            "model=wan_first_frame_tiny", "method.rollout=data", "training.max_steps=1",
        ])
    trainer = build_trainer(validate(cfg), tmp_path)
    adapter, seen = trainer.method.adapter, []
    forward = adapter.forward
    adapter.forward = lambda module, x_t, t, text, **cond: seen.append(cond) or forward(module, x_t, t, text, **cond)
    batches, data = [], trainer.data
    trainer.data = (batches.append(b) or b for b in data)
    trainer.advance()
    assert len(seen) == 4 and all(set(c) == {"first_frame"} for c in seen)
    frames = [c["first_frame"] for c in seen]
    assert frames[0].shape == (2, 16, 1, 16, 16) and frames[2].shape == (4, 16, 1, 16, 16)  # CFG doubles it
    assert torch.equal(frames[0], batches[0]["latents"][:, :, :1])
    assert torch.equal(frames[2][:2], frames[2][2:]) and torch.equal(frames[0], frames[1])


FAMILY_NEUTRAL = {"distill.models", "distill.models.flow_matching", "distill.models.folders"}


def test_no_module_outside_the_models_package_imports_or_names_a_family():
    """The family contract: code outside distill/models/ reaches a family only through the
    registry and the adapter interface. No import of a family's files, and no string in
    code (docstrings are prose) that is a family's name or names one of its classes."""
    import ast

    from distill.registry import FAMILIES, load_entries

    load_entries()
    names = set(FAMILIES)
    for family in FAMILIES.values():
        names |= {family.__name__, family.config_class.__name__, *family.folder_classes}
    found = []
    for path in [ROOT / "launch.py", *sorted((ROOT / "distill").rglob("*.py"))]:
        if "models" in path.relative_to(ROOT).parts[1:2]:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and ast.get_docstring(node, clean=False) is not None}
        for node in ast.walk(tree):
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            modules += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module == "distill.models":  # its submodules by name
                modules += [f"distill.models.{a.name}" for a in node.names
                            if (ROOT / "distill" / "models" / f"{a.name}.py").is_file()]
            found += [f"{path.name}:{node.lineno} imports {m}" for m in modules
                      if m.startswith("distill.models") and m not in FAMILY_NEUTRAL]
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found += [f"{path.name}:{node.lineno} names {n}" for n in names if n in node.value.split()
                          or node.value == n]
    assert not found, "\n".join(found)
