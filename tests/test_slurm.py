"""launcher=slurm against a real two-node SLURM cluster (CPU tasks)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, quiet, read_metrics, run_launch
from test_distributed import assert_same_metrics, exported

SLURM = ["launcher=slurm", "launcher.partition=debug", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1",
         "launcher.time_min=10", "training.torch_threads=1"]


def launch(slurm, args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **slurm.env)
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *quiet(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def queue(slurm):
    return slurm.run("squeue", "-h", "-o", "%i %T").split()


def test_two_task_job_equals_local_two_process_run(slurm, tmp_path):
    common = ["training.max_steps=4", "data.batch_size=2"]
    job = launch(slurm, [*SLURM, *common, "launcher.tasks_per_node=2", "launcher.wait=true", f"hydra.run.dir={tmp_path / 'slurm'}"])
    assert job.returncode == 0, job.stdout + job.stderr
    assert "succeeded" in job.stdout and "logs:" in job.stdout
    local = run_launch([*common, "launcher.nproc_per_node=2", "training.torch_threads=1", f"hydra.run.dir={tmp_path / 'local'}"])
    assert local.returncode == 0, local.stderr
    a, b = read_metrics(tmp_path / "slurm"), read_metrics(tmp_path / "local")
    assert_same_metrics(a, b, rel=1e-6)
    wa, wb = exported(tmp_path / "slurm"), exported(tmp_path / "local")
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)
    # the job ran a snapshot of the code taken at submission
    assert f"code {tmp_path / 'slurm' / 'code' / 'distill'}" in (tmp_path / "slurm" / "launch.log").read_text()
    assert json.loads((tmp_path / "slurm" / "code_version.json").read_text())["snapshot"]


def test_two_node_job_spans_both_nodes(slurm, tmp_path):
    if len(slurm.nodes) < 2:
        pytest.skip("this machine has one host name resolving to loopback: the test cluster has one node")
    run = tmp_path / "run"
    job = launch(slurm, [*SLURM, "launcher.nodes=2", "launcher.tasks_per_node=1", "training.max_steps=2",
                         "launcher.wait=true", f"hydra.run.dir={run}"])
    assert job.returncode == 0, job.stdout + job.stderr
    nodes = {line.split("node ")[1].split(",")[0] for line in
             [(run / "launch.log").read_text(), (run / "logs" / "rank-1.log").read_text()] for line in line.splitlines()
             if "rank " in line and " node " in line}
    assert nodes == set(slurm.nodes), nodes


def test_sweep_is_one_job_array(slurm, tmp_path):
    job = launch(slurm, ["-m", *SLURM, "launcher.tasks_per_node=1", "method.generator_lr=1e-6,2e-6",
                         "training.max_steps=2", "launcher.wait=true", f"hydra.sweep.dir={tmp_path}"])
    assert job.returncode == 0, job.stdout + job.stderr
    assert "submitted job array" in job.stdout and "with 2 points" in job.stdout
    array_id = job.stdout.split("submitted job array ")[1].split()[0]
    for point, lr in (("0", 1e-6), ("1", 2e-6)):
        info = json.loads((tmp_path / point / "slurm_job.json").read_text())
        assert info["job_id"] == f"{array_id}_{point}"
        assert read_metrics(tmp_path / point)[0]["lr/student"] == lr
        assert (tmp_path / point / "export" / "student" / "transformer" / "config.json").is_file()
    status = subprocess.run([sys.executable, "-m", "distill.status", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, **slurm.env))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "2 succeeded, 0 failed, 2 runs" in status.stdout


def test_evaluation_as_a_job_array_writes_what_one_process_writes(slurm, tmp_path):
    """python -m distill.evaluate ... launcher=slurm --array 2: two one-task jobs, one shard each;
    the videos equal a local single-process evaluation's, and metrics.json is written once all are in."""
    from conftest import train_here

    run = train_here(["experiment=tiny", "training.max_steps=2", "validation.num_samples=2", "logger=none",
                      "training.torch_threads=1", "training.export_at_end=false", f"hydra.run.dir={tmp_path / 'run'}"])
    (tmp_path / "prompts.txt").write_text("a red ball\nthe sea at night\na dog\n")
    common = [str(run), "--prompts", str(tmp_path / "prompts.txt"), "--samples", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **slurm.env)
    local = subprocess.run([sys.executable, "-m", "distill.evaluate", *common, "--out", str(tmp_path / "local")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    jobs = subprocess.run([sys.executable, "-m", "distill.evaluate", *common, "--out", str(tmp_path / "array"),
                           *SLURM[:-1], "launcher.wait=true", "--array", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert jobs.returncode == 0, jobs.stdout + jobs.stderr
    assert jobs.stdout.count("job ") == 2
    videos = lambda folder: {p.name: p.read_bytes() for p in (folder / "videos").iterdir()}
    assert videos(tmp_path / "array") == videos(tmp_path / "local") and len(videos(tmp_path / "local")) == 6
    assert json.loads((tmp_path / "array" / "metrics.json").read_text())["videos"] == 6
    # submitit sees a task's result before slurmd has finished its epilogue: the job may read RUNNING briefly
    _wait(lambda: queue(slurm) == [], 60, "the array's jobs to leave the queue")


def _wait(predicate, timeout, what, explain=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{explain()}")


def _job_state(slurm, run):
    """What a timed-out wait reports: the queue, the end of the job's log and of slurmctld's."""
    tail = lambda path: path.read_text()[-3000:] if path.is_file() else f"({path.name} missing)"
    return (f"squeue: {queue(slurm)}\n--- launch.log\n{tail(run / 'launch.log')}\n"
            f"--- slurmctld.log\n{tail(slurm.root / 'logs' / 'slurmctld.log')}")


def test_preempted_job_checkpoints_requeues_and_matches_uninterrupted_run(slurm, tmp_path):
    run = tmp_path / "run"
    common = ["training.max_steps=150", "checkpoint.every=1000", "method.generator_update_interval=3"]
    job = launch(slurm, [*SLURM, "launcher.tasks_per_node=1", *common, f"hydra.run.dir={run}"])
    assert job.returncode == 0, job.stdout + job.stderr
    job_id = json.loads((run / "slurm_job.json").read_text())["job_id"]
    explain = lambda: _job_state(slurm, run)
    _wait(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 20, 120, "step 20", explain)
    slurm.run("scancel", "--signal=USR2", job_id)
    _wait(lambda: "PENDING" in slurm.run("squeue", "-h", "-j", job_id, "-o", "%T"), 60, "the requeue", explain)
    slurm.run("scontrol", "update", f"JobId={job_id}", "BeginTime=now")
    # the test cluster holds a requeued job for cred_expire + 1 = 11 s, then schedules within 2 s
    _wait(lambda: (run / "export" / "student").is_dir() and not queue(slurm), 180, "the requeued job to finish",
          explain)
    log = (run / "launch.log").read_text()
    assert "caught SIGUSR2" in log and "requeued job" in log and "resumed from" in log
    stopped_at = int(log.split("stopped by SIGUSR2 at step ")[1].split(";")[0])
    assert 20 <= stopped_at < 150 and f"resumed from {run / f'checkpoint-{stopped_at}'}" in log
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 151))
    reference = run_launch([*common, "training.torch_threads=1", f"hydra.run.dir={tmp_path / 'reference'}"])
    assert reference.returncode == 0, reference.stderr
    wa, wb = exported(run), exported(tmp_path / "reference")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_failing_job_reads_as_failed_with_its_log(slurm, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "shard-00000.parquet").write_bytes(b"not parquet at all")  # passes validation, fails in the job
    job = launch(slurm, [*SLURM, "launcher.tasks_per_node=1", "data=parquet", f"data.path={data}",
                         "data.num_workers=0", "launcher.wait=true", f"hydra.run.dir={tmp_path / 'run'}"])
    assert job.returncode != 0
    assert "FAILED" in job.stderr and "corrupt parquet shard" in job.stderr
    log = job.stderr.split("log: ")[1].split()[0]
    assert log.endswith("_log.err") and "DataError" in open(log).read()
    assert "0 succeeded, 1 failed" in job.stdout
    status = subprocess.run([sys.executable, "-m", "distill.status", str(tmp_path / "run")], cwd=ROOT,
                            capture_output=True, text=True, env=dict(os.environ, **slurm.env))
    assert status.returncode == 1 and "failed (" in status.stdout and "0 succeeded, 1 failed, 1 runs" in status.stdout


def test_bad_config_never_reaches_the_queue(slurm, tmp_path):
    _wait(lambda: queue(slurm) == [], 60, "an empty queue")  # an earlier test's job may still be COMPLETING
    before = queue(slurm)
    bad = launch(slurm, [*SLURM, "method.student_steps=[]", f"hydra.run.dir={tmp_path / 'a'}"])
    assert bad.returncode != 0 and "method.student_steps is empty" in bad.stderr
    sweep = launch(slurm, ["-m", *SLURM, "method.generator_update_interval=5,0", f"hydra.sweep.dir={tmp_path / 'b'}"])
    assert sweep.returncode != 0 and "generator_update_interval=0" in sweep.stderr
    assert queue(slurm) == before == []


def test_dry_run_prints_the_sbatch_script(slurm, tmp_path):
    _wait(lambda: queue(slurm) == [], 60, "an empty queue")  # an earlier test's job may still be COMPLETING
    out = launch(slurm, [*SLURM, "launcher.nodes=2", "launcher.dry_run=true", "+launcher.sbatch_extra.reservation=r1",
                         f"hydra.run.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr
    for line in ("#SBATCH --nodes=2", "#SBATCH --signal=USR2@120", "#SBATCH --reservation=r1", "--kill-on-bad-exit=1"):
        assert line in out.stdout
    assert queue(slurm) == []
