"""The watcher: `python -m distill.evaluate RUN --prompts FILE --watch` scores each
checkpoint of a run as it completes, beside the training job.

Checkpoint N goes to <run>/eval/checkpoint-N/ (a checkpoint already scored there
is skipped, so a restarted watcher goes on where it stopped), and one record
{"step": N, "eval/<metric>": value, ...} into the run's metrics.jsonl. Where the
run logs to wandb online, the watcher writes into that same wandb run in wandb's
shared mode, against its own axis `eval/step` (the trainer owns the run's step).
It stops once the checkpoint of the run's last step is scored, or after
--idle-timeout-min without a new checkpoint."""

import json
import logging
import os
import time
from pathlib import Path

from omegaconf import OmegaConf

from distill.checkpoint import Checkpointer
from distill.config.schema import CheckpointConfig

log = logging.getLogger(__name__)


def eval_record(step: int, result: dict) -> dict:
    return {"step": step, "eval/videos": result["videos"], **{f"eval/{k}": v for k, v in result["metrics"].items()}}


def append_record(run: Path, record: dict) -> None:
    """One line, in one write: the trainer appends to the same file."""
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def watch(args, cfg, prompts) -> int:
    from distill.evaluate import evaluate_once
    from distill.evaluation import metrics as metric_registry
    from distill.evaluation.targets import device_for

    run = Path(args.target)
    if not (run / "config.yaml").is_file():
        raise ValueError(f"--watch: {run} is not a run folder (no config.yaml)")
    config = OmegaConf.load(run / "config.yaml")
    last_step = int(config.training.max_steps)
    checkpoints = Checkpointer(run, CheckpointConfig(folder=config.checkpoint.folder), runtime=None, fingerprint={})
    metrics = metric_registry.build(cfg, prompts, device_for(int(os.environ.get("LOCAL_RANK", 0))))  # once
    wandb_run = shared_wandb_run(run, config)
    idle_since = time.monotonic()
    log.info("watching %s for checkpoints up to step %d", run, last_step)
    while True:
        for checkpoint in checkpoints.complete():
            out = run / "eval" / checkpoint.name
            if (out / "metrics.json").is_file():
                continue
            step = Checkpointer.step_of(checkpoint)
            try:
                result = evaluate_once(args, cfg, prompts, checkpoint, out, metrics)
            except FileNotFoundError as err:  # pruned (checkpoint.keep_last) while it was read
                log.warning("checkpoint %s went away while it was scored: %s", checkpoint.name, err)
                continue
            idle_since = time.monotonic()
            if result is None:
                continue
            record = eval_record(step, result)
            append_record(run, record)
            if wandb_run is not None:
                wandb_run.log({"eval/step": step, **{k: v for k, v in record.items() if k != "step"}})
            print(f"checkpoint {step}: " + ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in record.items()
                                                     if k != "step"), flush=True)
        if (run / "eval" / checkpoints.path(last_step).name / "metrics.json").is_file():
            break
        if time.monotonic() - idle_since > args.idle_timeout_min * 60:
            print(f"no new checkpoint in {args.idle_timeout_min:g} min: the watcher stops")
            break
        time.sleep(args.poll_s)
    if wandb_run is not None:
        wandb_run.finish()
    return 0


def shared_wandb_run(run: Path, config):
    """The training run's wandb run, joined in shared mode (online runs only: an offline
    run has one writer), or None."""
    from distill.tracking import WANDB_ID_FILE, _logged_in

    if OmegaConf.select(config, "logger.name") != "wandb" or not (run / WANDB_ID_FILE).is_file():
        return None
    mode = OmegaConf.select(config, "logger.mode")
    if mode == "offline" or (mode == "auto" and not _logged_in()) or mode == "disabled":
        log.info("the run's wandb is offline: evaluation results go to metrics.jsonl and eval/ only")
        return None
    import wandb

    wandb_run = wandb.init(project=config.logger.project, entity=config.logger.entity,
                           id=(run / WANDB_ID_FILE).read_text().strip(),
                           settings=wandb.Settings(mode="shared", x_primary=False, x_label="eval-watcher",
                                                   silent=True, console="off"))
    wandb_run.define_metric("eval/*", step_metric="eval/step")
    return wandb_run
