"""`python launch.py --help`: what the tool does, the groups a user picks
(read from conf/ and sweeps/, each option with the first line of its
comment), and the common commands. Hydra's own page stays at --hydra-help."""

from pathlib import Path
from typing import Dict, List

from omegaconf import OmegaConf

INTRO = """\
launch.py: compose, validate and run a few-step diffusion distillation.

Picks one option per config group (group=option), overrides any key
(section.key=value), checks the whole config before anything is built, then
trains in this process, in N local processes, or on SLURM. A run folder
holds the config, launch.log, metrics.jsonl, samples/, checkpoints and the
exported student."""

COMMANDS = """\
Common commands:
  python launch.py                                  the digits demo: DMD2 + GAN into a 2-step student, CPU, ~7 min
  python launch.py experiment=tiny                  plumbing check: a tiny Wan on random data, seconds
  python launch.py experiment=wan21_t2v_1.3b_dmd2_3step data.path=DATA launcher=slurm launcher.nodes=8
  python launch.py -m +sweep=digits_lr              a sweep: one run folder per point
  python launch.py hydra.run.dir=RUN                continue RUN with its own config (training.max_steps=N extends it)
  python launch.py launcher.nproc_per_node=2        two local processes, FSDP2
  python launch.py experiment=tiny launcher.nproc_per_node=2 parallel.context=2
                                                    context parallelism: the ranks split each sample's tokens
  python launch.py experiment=wan21_t2v_14b_dmd2_4step_cp4 plan=true
                                                    memory per GPU and what fits; builds nothing (exit 2: does not fit)
  python launch.py --cfg job                        print the composed config and stop
  python -m distill.export RUN                      export the newest checkpoint in diffusers format
  python -m distill.sample RUN/export/student --prompt "the digit 7 moving left" --out clip.gif
  python -m distill.evaluate RUN --prompts prompts.txt [--role teacher] [--clip-model DIR] [--watch]
                                                    videos named as VBench reads them, metrics.json

Exit codes: 0 done or already finished, 1 failed, 2 config refused (or plan does not fit), 3 bad data,
4 bad checkpoint, 5 a NaN/inf loss, 6 a collapsed student (validation.stop_on_collapse),
128+N stopped by signal N (checkpoint written; resume command printed).
Every key and its default: distill/config/schema.py. Hydra's own help: --hydra-help."""


def describe(file: Path, width: int = 72) -> str:
    """The first sentence of a YAML file's leading comment (package directives skipped)."""
    words = []
    for line in file.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("@package"):
            continue
        if not text or text.startswith(("python ", "Source:")):
            break
        words.append(text)
    sentence = " ".join(words).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[: width - 3].rsplit(" ", 1)[0] + " ..."


def defaults(conf: Path) -> Dict[str, str]:
    """group -> the option config.yaml picks."""
    chosen = {}
    for entry in OmegaConf.load(conf / "config.yaml").defaults:
        if isinstance(entry, str) or entry is None:
            continue
        for group, option in entry.items():
            if "/" not in group and " " not in group:
                chosen[group] = str(option)
    return chosen


def group_lines(name: str, folder: Path, default: str, prefix: str = "") -> List[str]:
    lines = [f"  {prefix}{name}:" + (f" (default: {default})" if default and default != "None" else "")]
    for file in sorted(folder.glob("*.yaml")):
        lines.append(f"    {file.stem:<40} {describe(file)}")
    return lines


def help_page(conf: Path, sweeps: Path) -> str:
    chosen = defaults(conf)
    lines = [INTRO, "", "Config groups (pick with group=option):"]
    for folder in sorted(p for p in conf.iterdir() if p.is_dir()):
        lines += group_lines(folder.name, folder, chosen.get(folder.name, ""))
    lines += group_lines("sweep", sweeps, "", prefix="+")
    return "\n".join(lines + ["", COMMANDS])
