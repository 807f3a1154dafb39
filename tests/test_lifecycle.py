"""A run's life as a user sees it: continuing with its saved config, a finished
run relaunched, stopping by signal, refused continuations, damaged checkpoints
and bad data, each with its exit code and one-line message."""

import json
import logging
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config, launch_as_typed as launch, launch_background, quiet, read_metrics, wait_for_records
from distill.config import validate
from distill.config.resume import merge_overrides
from distill.preemption import StopRequest
from distill.run import train

TINY = ["training.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=0", "method.generator_update_interval=3"]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def student_weights(run):
    return load_file(run / "export" / "student" / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
    """A tiny run of 4 steps (checkpoints at 2 and 4), and an uninterrupted 6-step one."""
    base = tmp_path_factory.mktemp("lifecycle")
    run, straight = base / "run", base / "straight"
    first = launch([*quiet(TINY), f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr
    done = launch([*quiet([*TINY, "training.max_steps=6"]), f"hydra.run.dir={straight}"])
    assert done.returncode == 0, done.stderr
    return run, straight


def test_a_continuation_that_changes_the_run_is_refused_and_writes_nothing(four_step_run):
    run, _ = four_step_run
    before = snapshot(run)
    result = launch([f"hydra.run.dir={run}", "data.batch_size=3", "seed=7", "training.max_steps=8"])
    assert result.returncode == 2
    assert "data.batch_size: the run has 2, this launch gives 3" in result.stderr
    assert "seed: the run has 0, this launch gives 7" in result.stderr
    assert "training.max_steps" not in result.stderr  # that one may change
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(run) == before


def test_a_finished_run_relaunched_says_so_and_writes_no_records(four_step_run):
    run, _ = four_step_run
    metrics = (run / "metrics.jsonl").read_bytes()
    result = launch([f"hydra.run.dir={run}"])
    assert result.returncode == 0, result.stderr
    assert f"the run in {run} is finished at step 4 (training.max_steps=4)" in result.stdout
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert not (run / "checkpoint-5").exists()


def test_continuing_with_more_steps_equals_the_uninterrupted_run(four_step_run):
    """Only the new length is given: the run's saved overrides (experiment=tiny,
    logger=none, its cadences) compose the rest."""
    run, straight = four_step_run
    result = launch([f"hydra.run.dir={run}", "training.max_steps=6"])
    assert result.returncode == 0, result.stderr
    assert f"resumed from {run / 'checkpoint-4'} at step 4" in (run / "launch.log").read_text()
    a, b = read_metrics(run), read_metrics(straight)
    assert [r["step"] for r in a] == list(range(1, 7))
    assert [r["loss/critic"] for r in a] == [r["loss/critic"] for r in b]
    wa, wb = student_weights(run), student_weights(straight)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    assert "experiment=tiny" in overrides and "training.max_steps=6" in overrides and "training.max_steps=4" not in overrides
    launches = (run / ".hydra" / "launches.yaml").read_text()
    assert launches.count("time:") >= 2 and "- training.max_steps=6" in launches


def test_merged_overrides_keep_the_history_order():
    saved = ["experiment=tiny", "training.max_steps=4", "+roles.student.lora.rank=4"]
    new = ["logger=none", "training.max_steps=6", "roles.student.lora.rank=8"]
    assert merge_overrides(saved, new) == ["experiment=tiny", "training.max_steps=6", "roles.student.lora.rank=8",
                                           "logger=none"]


def test_a_signal_stop_exits_128_plus_the_signal_and_prints_the_resume_command(tmp_path):
    run = tmp_path / "run"
    proc = launch_background(["training.max_steps=100000", f"hydra.run.dir={run}"])
    try:
        wait_for_records(run, 3)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM at step" in stderr and "run failed" not in stderr
    assert f"resume with: python launch.py hydra.run.dir={run}" in stderr
    assert "Traceback" not in stderr
    step = int(stderr.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert (run / f"checkpoint-{step}" / "trainer.json").is_file()


def test_ctrl_c_asks_for_a_stop_and_a_second_one_interrupts():
    previous = signal.getsignal(signal.SIGINT)
    try:
        stop = StopRequest().install()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, previous if sig == signal.SIGINT else signal.SIG_DFL)


def _damage(file):
    file.write_bytes(file.read_bytes()[:100])


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    run, straight = tmp_path / "run", tmp_path / "straight"
    train(validate(compose_config(TINY)), run)
    _damage(run / "checkpoint-4" / "ranks" / "rank-0.safetensors")
    with caplog.at_level(logging.INFO, logger="distill"):
        train(validate(compose_config([*TINY, "training.max_steps=6"])), run)
    assert (f"checkpoint {run / 'checkpoint-4'} is damaged (ranks/rank-0.safetensors does not match its checksum); "
            "moved to checkpoint-4.damaged") in caplog.text
    assert f"resuming from {run / 'checkpoint-2'} (step 2)" in caplog.text
    assert (run / "checkpoint-4.damaged" / "trainer.json").is_file()  # kept, moved aside
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))  # steps 3-4 of the lost trajectory set aside
    discarded = [json.loads(line) for line in (run / "metrics.discarded.jsonl").read_text().splitlines()]
    # the lost trajectory's training records and its closing validation's (health statistics)
    assert [(r["step"], any(k.startswith("val/") for k in r)) for r in discarded] == [(3, False), (4, False), (4, True)]
    train(validate(compose_config([*TINY, "training.max_steps=6"])), straight)
    wa, wb = student_weights(run), student_weights(straight)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_damaged_checkpoint_named_by_resume_from_stops_in_one_line(tmp_path):
    run = tmp_path / "run"
    train(validate(compose_config(TINY)), run)
    _damage(run / "checkpoint-2" / "state" / next(p.name for p in (run / "checkpoint-2" / "state").glob("*.safetensors")))
    result = launch([*quiet([*TINY, "training.max_steps=6", f"checkpoint.resume_from={run / 'checkpoint-2'}"]),
                     f"hydra.run.dir={tmp_path / 'other'}"])
    assert result.returncode == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"checkpoint error: checkpoint.resume_from={run / 'checkpoint-2'} is damaged: state/")
    assert "does not match its checksum" in lines[-1] and "Traceback" not in result.stderr
    assert (run / "checkpoint-2" / "trainer.json").is_file()  # nothing is moved or deleted


def test_a_checkpoint_of_another_config_stops_in_one_line(tmp_path):
    run = tmp_path / "run"
    train(validate(compose_config(TINY)), run)
    result = launch([*quiet([*TINY, "data.batch_size=3", f"checkpoint.resume_from={run / 'checkpoint-4'}",
                             "training.max_steps=6"]), f"hydra.run.dir={tmp_path / 'other'}"])
    assert result.returncode == 4
    assert "does not fit this config" in result.stderr
    assert "data.batch_size: checkpoint has 2, this run has 3" in result.stderr
    assert "Traceback" not in result.stderr


PARQUET = ["data=parquet", "model.latent_shape=[4,2,4,4]", "model.text_len=6", "model.text_dim=5",
           "model.arch.in_channels=4", "model.arch.out_channels=4", "model.arch.text_dim=5", "training.max_steps=2",
           "method.rollout=data", "data.num_workers=0"]


def _rows(n, channels=4, nan=False):
    from distill.data.schema import make_row

    g = torch.Generator().manual_seed(0)
    latent = lambda: torch.full((channels, 2, 4, 4), float("nan")) if nan else torch.randn(channels, 2, 4, 4, generator=g)
    return [make_row(f"clip-{i}", torch.randn(3, 5, generator=g), f"caption {i}", latent()) for i in range(n)]


def _edit_table(file, edit):
    import pyarrow.parquet as pq

    pq.write_table(edit(pq.read_table(file)), file)


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _unknown_dtype(file):
    import pyarrow as pa

    _edit_table(file, lambda t: t.set_column(t.schema.get_field_index("vae_latent_dtype"), "vae_latent_dtype",
                                             pa.array(["complex64"] * t.num_rows)))


def _drop_text_dtype(file):
    _edit_table(file, lambda t: t.drop_columns(["text_embedding_dtype"]))


@pytest.mark.parametrize("case,rows,damage,message", [
    ("truncated shard", {}, _truncate, "shard-00000.parquet: corrupt parquet shard"),
    ("wrong channels", {"channels": 8}, None, "shard-00000.parquet row 0 (id clip-0): latent shape [8, 2, 4, 4] "
                                              "does not fit the model's 4 channels"),
    ("missing column", {}, _drop_text_dtype, "shard-00000.parquet: missing columns ['text_embedding_dtype']"),
    ("unknown dtype", {}, _unknown_dtype, "shard-00000.parquet row 0 (id clip-0): vae_latent_dtype 'complex64' "
                                          "is not one of"),
    ("NaN row", {"nan": True}, None, "latent holds NaN or inf"),
])
def test_bad_data_stops_the_launch_in_one_line_with_exit_3(tmp_path, case, rows, damage, message):
    from distill.data.writer import write_dataset

    data = tmp_path / "data"
    write_dataset(_rows(8, **rows), data)
    if damage:
        damage(data / "shard-00000.parquet")
    result = launch([*quiet([*PARQUET, f"data.path={data}"]), f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 3, (case, result.stderr[-2000:])
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("data error: ") and message in last, (case, last)
    assert "Traceback" not in result.stderr + result.stdout, case
