"""Run health: the sample statistics by hand, the findings against the teacher, a
collapsed student warned about or stopped with a checkpoint, and a NaN loss
stopping the run at once."""

import pytest
import torch

from conftest import compose_config
from distill.config import validate
from distill.config.schema import HealthConfig
from distill.launcher import EXIT_COLLAPSE, EXIT_NONFINITE, outcome
from distill.run_health import Collapse, NonFiniteLoss
from distill.validation.health import clip_statistics, findings


def test_clip_statistics_by_hand():
    """One grey clip whose 2 frames go from black to white (pixels -1 then 1): motion 1,
    both frames one colour; one RGB pixel (1, 0.5, 0) has saturation 1, a grey one 0."""
    clip = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0)], dim=1)[None]  # [1, 1, 2, 2, 2]
    stats = clip_statistics(clip)
    assert stats == {"flat_share": 1.0, "motion": 1.0}
    rgb = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 1, 2)  # two pixels, one frame
    assert clip_statistics(rgb)["saturation"] == pytest.approx(0.5)  # (1 + 0) / 2
    red = torch.tensor([1.0, -1.0, -1.0]).reshape(1, 3, 1, 1, 1).expand(1, 3, 2, 4, 4)
    assert clip_statistics(red)["flat_share"] == 1.0  # a solid colour is flat, whatever its channels differ by
    seeds = torch.stack([torch.zeros(1, 2, 4, 4), torch.full((1, 2, 4, 4), 1.0), torch.zeros(1, 2, 4, 4)])
    # on [0, 1]: 0.5, 1, 0.5 -> pairs 0.5, 0, 0.5
    assert clip_statistics(clip, seeds)["diversity"] == pytest.approx(1 / 3)


def test_findings_name_what_the_student_looks_like_against_the_teacher():
    cfg = HealthConfig()
    teacher = {"motion": 0.1, "flat_share": 0.0, "diversity": 0.2}
    assert findings(dict(teacher), teacher, cfg) == []
    found = findings({"motion": 0.01, "flat_share": 0.9, "diversity": 0.01}, teacher, cfg)
    assert [line.split(":")[0] for line in found] == ["static", "flat", "collapsed"]
    assert "validation.health.motion_floor=0.25" in found[0] and "90% of frames one colour" in found[1]


def test_exit_codes_of_a_stopped_run():
    code, message = outcome(lambda: (_ for _ in ()).throw(NonFiniteLoss(7, 7, ["loss/student=nan"], None)), None)
    assert code == EXIT_NONFINITE == 5 and message.startswith("non-finite loss: loss/student=nan at step 7")
    code, message = outcome(lambda: (_ for _ in ()).throw(Collapse(4, ["static: ..."])), None)
    assert code == EXIT_COLLAPSE == 6 and "a checkpoint was written" in message


TINY = ["experiment=tiny", "validation.every=2", "validation.num_samples=2", "validation.teacher_steps=2",
        "training.max_steps=4", "checkpoint.every=100", "training.export_at_end=false"]


@pytest.fixture
def constant_student(monkeypatch):
    """The student's sampler returns one flat grey clip for every prompt and seed."""
    from distill.sampling import FewStepSampler

    monkeypatch.setattr(FewStepSampler, "__call__", lambda self, adapter, role, text, *a, **k:
                        torch.zeros(text.shape[0], *adapter.latent_shape, device=text.device))


def test_a_collapsed_student_is_named_in_the_log_and_the_run_goes_on(constant_student, tmp_path, caplog):
    from distill.run import train

    train(validate(compose_config(TINY)), tmp_path)
    said = [r.getMessage() for r in caplog.records if "health at step" in r.getMessage()]
    assert {line.split("looks ")[1].split(":")[0] for line in said} == {"static", "flat", "collapsed"}
    assert any(line.startswith("health at step 2:") for line in said) and (tmp_path / "checkpoint-4").is_dir()


def fixed_output(monkeypatch, make):
    """The student's sampler returns make(shape) for every prompt and seed."""
    from distill.sampling import FewStepSampler

    monkeypatch.setattr(FewStepSampler, "__call__", lambda self, adapter, role, text, *a, **k:
                        make((text.shape[0], *adapter.latent_shape)).to(text.device))


def warned(caplog):
    return {line.split("looks ")[1].split(":")[0]
            for line in (r.getMessage() for r in caplog.records) if "health at step" in line}


def test_a_static_student_and_a_flat_coloured_one_are_each_named(monkeypatch, tmp_path, caplog):
    """Static: one textured frame, held over time and the same for every seed (its output fixed):
    static and collapsed, not flat. Flat: every frame one colour, changing over time and seeds."""
    from distill.run import train

    texture = torch.rand(torch.Size([1, 16, 1, 16, 16]), generator=torch.Generator().manual_seed(0)) * 2 - 1
    fixed_output(monkeypatch, lambda shape: texture.expand(shape[0], -1, shape[2], -1, -1))
    train(validate(compose_config(TINY)), tmp_path / "static")
    assert warned(caplog) == {"static", "collapsed"}
    caplog.clear()
    fixed_output(monkeypatch, lambda shape: (torch.rand(*shape[:3], 1, 1) * 2 - 1).expand(shape))
    train(validate(compose_config(TINY)), tmp_path / "flat")
    assert warned(caplog) == {"flat"}


def test_stop_on_collapse_ends_the_run_with_a_checkpoint(constant_student, tmp_path):
    from distill.run import train

    with pytest.raises(Collapse) as stopped:
        train(validate(compose_config([*TINY, "validation.stop_on_collapse=true"])), tmp_path)
    assert stopped.value.step == 2 and "static: motion 0" in str(stopped.value)
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "checkpoint-4").exists()


def test_a_nan_loss_stops_the_run_at_that_step_without_saving_it(tmp_path, monkeypatch):
    from distill.methods import dmd2
    from distill.run import train

    calls = []
    original = dmd2.generator_loss
    monkeypatch.setattr(dmd2, "generator_loss", lambda x0, grad: calls.append(1) or (
        original(x0, grad) * (float("nan") if len(calls) == 3 else 1.0)))
    config = validate(compose_config(["experiment=tiny", "training.max_steps=6", "checkpoint.every=1",
                                      "method.generator_update_interval=1", "validation.every=0"]))
    with pytest.raises(NonFiniteLoss) as stopped:
        train(config, tmp_path)
    assert str(stopped.value).startswith("loss/student=nan at step 3: the run stopped without saving this state; "
                                         f"the last good checkpoint is {tmp_path / 'checkpoint-2'}")
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "checkpoint-3").exists()
