"""Between log steps the training loop reads nothing back from the device.

Every read of a tensor into Python (`.item()`, `.tolist()`, `.cpu()`,
`.numpy()`, `float()`, `int()`, `bool()`) made by the project's own code is
counted, inside and outside the iterations. Floating-point and boolean tensors
count: in the loop those are computed on the device (losses, norms, sigmas),
and on a GPU each read waits for everything queued before it. Integer tensors
in the loop are host bookkeeping by construction (the sample ids, the shared
generator's draws), so they are not counted."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import compose_config, read_metrics
from distill.config import validate
from distill.run import train
from distill.trainer import Trainer

PROJECT = str(Path(__file__).resolve().parents[1] / "distill")
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


@pytest.fixture
def reads(monkeypatch):
    """(inside, outside): the reads of device-computed tensors by the project's code
    within iterations (train_step) and elsewhere (log lines), as (how, file:line)."""
    inside, outside = [], []
    state = {"in_step": False}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(PROJECT) and (self.is_floating_point() or self.dtype == torch.bool):
                where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                (inside if state["in_step"] else outside).append((_name, where))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step = Trainer.train_step

    def train_step(self, iteration):
        state["in_step"] = True
        try:
            return step(self, iteration)
        finally:
            state["in_step"] = False

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return inside, outside


@pytest.mark.parametrize("method", [["method.gan.enabled=true", "method.gan.blocks=[0]"], ["method=finetune"]],
                         ids=["dmd2_gan", "finetune"])
def test_no_host_reads_inside_iterations(reads, tmp_path, method):
    inside, outside = reads
    config = validate(compose_config(["experiment=tiny", *method, "training.max_steps=6", "training.log_every=3",
                                      "checkpoint.every=0", "validation.every=0", "training.export_at_end=false"]))
    train(config, tmp_path)
    assert inside == [], inside
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [3, 6]
    assert all(r["loss/student"] > 0 and r["step_time"] > 0 for r in records), records
    # the counter sees reads: the log lines' one transfer per window
    assert ("tolist", "tracking.py") in {(how, where.split(":")[0]) for how, where in outside}, outside
