"""VBench's dimensions, through its Python API, on the evaluation's videos.

VBench (`pip install vbench`, in an environment of its own: it pins
transformers 4.33) reads its networks from VBENCH_CACHE_DIR; it runs in its
local mode, so nothing downloads. With VBench's own prompt list
(VBench_full_info.json) it runs its standard mode, where videos are found by
`{prompt}-{index}.mp4`; with custom prompts, its custom-input mode with each
video's prompt, which only some dimensions accept."""

import importlib.util
import json
import os
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from distill.evaluation.prompts import Item

# VBench 0.1.5 refuses these on custom prompts (VBench.check_dimension_requires_extra_info)
NEED_VBENCH_PROMPTS = ("object_class", "multiple_objects", "scene", "appearance_style", "color",
                       "spatial_relationship")
CUSTOM_DIMENSIONS = ("subject_consistency", "background_consistency", "aesthetic_quality", "imaging_quality",
                     "temporal_flickering", "motion_smoothness", "dynamic_degree", "overall_consistency",
                     "human_action", "temporal_style")


def standard_dimensions(prompts_file: Path) -> List[str]:
    """The dimensions a VBench prompt list names (empty: not VBench's own list)."""
    if Path(prompts_file).suffix != ".json":
        return []
    entries = json.loads(Path(prompts_file).read_text())
    names = [d for e in entries if isinstance(e, dict) for d in e.get("dimension", [])]
    return list(dict.fromkeys(names))


def check(cache: str, dimensions: List[str], prompts_file: Path) -> List[str]:
    """Problems that stop VBench from running here, one line each."""
    problems = []
    if importlib.util.find_spec("vbench") is None:
        problems.append("vbench: the vbench package is not importable here (pip install vbench, in an "
                        "environment of its own); its CLI runs on the videos/ folder unchanged")
    if not Path(cache).is_dir():
        problems.append(f"vbench_cache={cache}: no such folder (VBENCH_CACHE_DIR with VBench's checkpoints)")
    standard = standard_dimensions(prompts_file)
    known = set(standard) or set(CUSTOM_DIMENSIONS)
    allowed = "this VBench prompt list names" if standard else "custom prompts allow"
    for name in dimensions:
        if name not in known:
            problems.append(f"vbench_dimensions: {name} is not one {allowed} ({', '.join(sorted(known))})")
    return problems


class VBenchDimensions:
    name = "vbench"

    def __init__(self, cache: str, dimensions: List[str], prompts_file: Path, device: torch.device):
        self.cache, self.prompts_file, self.device = cache, Path(prompts_file), device
        standard = standard_dimensions(prompts_file)
        self.standard = bool(standard)
        self.dimensions = list(dimensions) or standard or list(CUSTOM_DIMENSIONS)

    def __call__(self, videos: List[Tuple[Item, torch.Tensor]], folder: Path) -> Dict[str, float]:
        os.environ["VBENCH_CACHE_DIR"] = str(Path(self.cache).resolve())  # read when vbench is imported
        import vbench
        from vbench import VBench

        out = folder / "vbench"
        if self.standard:
            bench, kwargs = VBench(self.device, str(self.prompts_file), str(out)), {"mode": "vbench_standard"}
        else:
            full_info = str(Path(vbench.__file__).parent / "VBench_full_info.json")
            bench = VBench(self.device, full_info, str(out))
            kwargs = {"mode": "custom_input", "prompt_list": {item.file_name: item.prompt for item, _ in videos}}
        bench.evaluate(videos_path=str(folder / "videos"), name="distill", dimension_list=self.dimensions,
                       local=True, **kwargs)
        results = json.loads((out / "distill_eval_results.json").read_text())
        return {f"vbench/{name}": float(value[0]) for name, value in results.items()}
