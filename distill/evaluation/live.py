"""validation.evaluate.every: the live student evaluated on the prompt file during
training, every N steps and at the end, into <run>/eval/checkpoint-N/ (the
watcher's folder for the same step), its metrics logged under eval/... (wandb
and metrics.jsonl). Every rank samples a share of the videos; a sharded
student's ranks call its forward equally often (the short shares pad)."""

from pathlib import Path
from typing import Dict

from distill.evaluation import metrics as metric_registry
from distill.evaluation.prompts import read_prompts
from distill.evaluation.scoring import claim_folder, sample_share, score, spec
from distill.evaluation.targets import Target
from distill.model_card import config_hash
from distill.registry import method_class


class LiveEvaluation:
    def __init__(self, config, adapter, run_dir: Path, runtime):
        self.cfg = config.validation.evaluate
        self.every = self.cfg.every
        self.prompts = read_prompts(Path(self.cfg.prompts))
        self.sampler = method_class(config.method.name).sampler(config.method, adapter, "student")
        self.adapter, self.run_dir, self.runtime = adapter, Path(run_dir), runtime
        self.folder = config.checkpoint.folder
        self.config_sha256 = config_hash(run_dir)
        self.metrics = None  # built at the first scoring (rank 0), kept for the later ones

    def run(self, roles, step: int) -> Dict[str, float]:
        role, rt = roles["student"], self.runtime
        target = Target(self.adapter, role, self.sampler, self.run_dir, "live", "student", step, self.config_sha256)
        out = self.run_dir / "eval" / self.folder.format(step=step)
        if rt.is_main:
            claim_folder(out, spec(target, self.cfg, self.prompts))
        rt.barrier()
        was_training = role.module.training
        role.module.eval()
        try:  # a context group samples each video together: shares go by data-parallel rank
            sample_share(target, self.cfg, self.prompts, out, rt.dp_rank, rt.dp_size, pad_to_share=rt.distributed)
        finally:
            role.module.train(was_training)
        rt.barrier()
        if not rt.is_main:
            return {}
        if self.metrics is None:
            self.metrics = metric_registry.build(self.cfg, self.prompts, rt.device)
        result = score(target, self.cfg, self.prompts, out, rt.device, self.metrics)
        return {"eval/videos": result["videos"], **{f"eval/{k}": v for k, v in result["metrics"].items()}}
