"""python -m distill.evaluate: videos named as VBench expects at fixed seeds, resumable,
sharded over ranks; metrics.json; CLIP score and FVD on stand-in networks by hand;
refusals in one line; the watcher and the evaluation during training."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, launch_background, train_here
from distill.evaluate import main as evaluate

TINY = ["experiment=tiny", "training.max_steps=4", "validation.num_samples=2", "training.torch_threads=1",
        "logger=none"]
PROMPTS = "a red ball\n# not a prompt\n\nthe digit 3 moving left\na red ball\nthe sea at night\n"


@pytest.fixture(scope="module")
def run(built_once) -> Path:
    """A tiny trained run (checkpoint-4 and its export)."""
    return built_once("evaluate-run", lambda f: train_here([*TINY, f"hydra.run.dir={f / 'run'}"])) / "run"


@pytest.fixture
def prompts(tmp_path) -> Path:
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    return tmp_path / "prompts.txt"


def names(folder: Path):
    return sorted(p.name for p in (folder / "videos").iterdir())


def contents(folder: Path):
    return {p.name: p.read_bytes() for p in (folder / "videos").iterdir()}


def test_an_export_is_sampled_into_vbench_names_and_a_rerun_skips_them(run, prompts, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate([str(run / "export" / "student"), "--prompts", str(prompts), "--samples", "2", "--out", str(out)]) == 0
    # a prompt listed twice is sampled once; comments and blank lines are skipped
    assert names(out) == ["a red ball-0.mp4", "a red ball-1.mp4", "the digit 3 moving left-0.mp4",
                          "the digit 3 moving left-1.mp4", "the sea at night-0.mp4", "the sea at night-1.mp4"]
    result = json.loads((out / "metrics.json").read_text())
    exported = json.loads((run / "export" / "student" / "distill.json").read_text())
    assert result["seeds"] == [0, 1] and result["samples_per_prompt"] == 2 and result["num_prompts"] == 3
    assert result["sampler"] == exported["sampler"] and result["step"] == 4 and result["videos"] == 6
    assert len(result["commit"]) == 40 and result["config_sha256"] == exported["config_sha256"] != "unknown"
    card = (run / "export" / "student" / "README.md").read_text()
    assert f"training config sha256: {result['config_sha256']}" in card
    first = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    before = contents(out)
    (out / "videos" / "the sea at night-1.mp4").unlink()
    capsys.readouterr()
    assert evaluate([str(run / "export" / "student"), "--prompts", str(prompts), "--samples", "2", "--out", str(out)]) == 0
    again = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    assert [n for n in again if again[n] != first.get(n)] == ["the sea at night-1.mp4"]  # only the missing one
    assert contents(out) == before  # the same seed gives the same video
    # another setup into the same folder is refused, naming what differs
    assert evaluate([str(run / "export" / "student"), "--prompts", str(prompts), "--samples", "2", "--seed", "5",
                     "--out", str(out)]) == 2
    assert "another seeds ([5, 6]" in capsys.readouterr().err.replace("another seeds ([0, 1], now ", "another seeds (")


@pytest.mark.multiprocess
def test_shards_and_two_ranks_write_the_same_files_as_one(run, prompts, tmp_path):
    target = str(run / "checkpoint-4")
    one, shards, ranks = tmp_path / "one", tmp_path / "shards", tmp_path / "ranks"
    assert evaluate([target, "--prompts", str(prompts), "--samples", "2", "--out", str(one)]) == 0
    assert evaluate([target, "--prompts", str(prompts), "--samples", "2", "--out", str(shards), "--shard", "0/2"]) == 0
    assert len(names(shards)) == 3 and not (shards / "metrics.json").exists()  # scored once all are in
    assert evaluate([target, "--prompts", str(prompts), "--samples", "2", "--out", str(shards), "--shard", "1/2"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "distill.evaluate", target, "--prompts", str(prompts), "--samples", "2", "--out",
                           str(ranks)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert contents(one) == contents(shards) == contents(ranks) and len(contents(one)) == 6
    for folder in (one, shards, ranks):
        assert json.loads((folder / "metrics.json").read_text())["videos"] == 6


def test_the_teacher_is_a_target_on_the_same_prompts_and_seeds(run, prompts):
    assert evaluate([str(run), "--prompts", str(prompts), "--role", "teacher", "--steps", "3"]) == 0
    out = run / "eval" / "teacher-3step"
    result = json.loads((out / "metrics.json").read_text())
    assert result["sampler"]["kind"] == "euler" and len(result["sampler"]["sigmas"]) == 3
    assert result["role"] == "teacher" and result["seeds"] == [0] and len(names(out)) == 3


def test_vbench_prompt_list_and_refusals_in_one_line(run, tmp_path, capsys):
    from distill.evaluation.prompts import read_prompts
    from distill.evaluation.vbench_dimensions import standard_dimensions

    listing = [{"prompt_en": "a dog running", "dimension": ["dynamic_degree", "subject_consistency"]},
               {"prompt_en": "a red apple", "dimension": ["color"]}]
    (tmp_path / "vbench.json").write_text(json.dumps(listing))
    assert read_prompts(tmp_path / "vbench.json") == ["a dog running", "a red apple"]
    assert standard_dimensions(tmp_path / "vbench.json") == ["dynamic_degree", "subject_consistency", "color"]
    (tmp_path / "slash.txt").write_text("fine\nleft/right\n")
    from distill.validation.media import save_clip

    for i in range(2):
        save_clip(torch.zeros(3, 2, 8, 8), tmp_path / f"reference-{i}.mp4")
    target = str(run / "export" / "student")
    cases = {
        ("--prompts", str(tmp_path / "slash.txt")): "prompt 2 ('left/right'): holds '/'",
        ("--prompts", str(tmp_path / "vbench.json"), "--metrics", "clip_score"):
            "metric clip_score needs clip_model: give --clip-model / validation.evaluate.clip_model",
        ("--prompts", str(tmp_path / "vbench.json"), "--i3d-model", str(tmp_path / "no.pt"), "--fvd-reference",
         str(tmp_path)): f"i3d_model={tmp_path / 'no.pt'}: no such file or folder",
        ("--prompts", str(tmp_path / "vbench.json"), "--vbench-cache", str(tmp_path)):
            "vbench: the vbench package is not importable here",
    }
    for args, message in cases.items():
        capsys.readouterr()
        assert evaluate([target, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (run / "export" / "student" / "eval").exists()  # refused before any sampling


def tiny_clip(folder: Path) -> Path:
    """A random CLIP with a character-level tokenizer, saved as a transformers folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, **layers),
                        vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_clip_score_equals_a_hand_computation(tmp_path):
    from transformers import AutoProcessor, CLIPModel

    from distill.evaluation.clip_score import ClipScore
    from distill.evaluation.prompts import Item

    folder = tiny_clip(tmp_path / "clip")
    torch.manual_seed(1)
    clips = [torch.rand(3, 2, 40, 40) * 2 - 1 for _ in range(2)]
    prompts = ["a red ball", "the sea"]
    model, processor = CLIPModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    expected = []
    with torch.no_grad():
        for prompt, clip in zip(prompts, clips):
            frames = [((f.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy() for f in clip.unbind(1)]
            inputs = processor(text=[prompt], images=frames, return_tensors="pt", padding=True)
            image = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
            text = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                          attention_mask=inputs["attention_mask"]).pooler_output)
            cosine = (image / image.norm(dim=-1, keepdim=True)) @ (text / text.norm(dim=-1, keepdim=True)).T
            expected.append(float((100 * cosine.clamp(min=0)).mean()))
    metric = ClipScore(str(folder), torch.device("cpu"))
    items = [Item(i, p, 0, 0) for i, p in enumerate(prompts)]
    assert metric(list(zip(items, clips)), tmp_path)["clip_score"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert 0 <= min(expected) and max(expected) <= 100 and expected[0] != expected[1]


class TinyScriptedI3D(torch.nn.Module):
    """The call of the TF-Hub-matching TorchScript I3D (rescale, resize, return_features)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, (2, 16, 16), stride=(1, 16, 16))

    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))


def test_fvd_of_a_set_against_itself_is_zero_and_grows_with_noise(tmp_path):
    from distill.evaluation.fvd import FVD
    from distill.evaluation.i3d import InceptionI3d
    from distill.validation.media import save_clip

    torch.manual_seed(0)
    torch.jit.script(TinyScriptedI3D()).save(str(tmp_path / "i3d_torchscript.pt"))
    torch.save(InceptionI3d(num_classes=16, width=1 / 16).state_dict(), tmp_path / "i3d_state.pt")
    base = [torch.rand(3, 8, 16, 16) * 2 - 1 for _ in range(6)]
    (tmp_path / "reference").mkdir()
    for i, clip in enumerate(base):
        save_clip(clip, tmp_path / "reference" / f"clip-{i}.mp4")
    for network in ("i3d_torchscript.pt", "i3d_state.pt"):
        fvd = FVD(str(tmp_path / network), str(tmp_path / "reference"), torch.device("cpu"))
        assert len(fvd.reference) == 6
        itself = fvd.distance(base, base)
        noisy = [fvd.distance([c + s * torch.randn_like(c) for c in base], base) for s in (0.2, 0.6)]
        assert abs(itself) < 1e-6 * noisy[0], network
        assert 0 < noisy[0] < noisy[1], network


def test_the_watcher_scores_checkpoints_as_a_short_run_writes_them_then_stops(prompts, tmp_path):
    run = tmp_path / "run"
    training = launch_background(["experiment=tiny", "training.max_steps=12", "checkpoint.every=4",
                                  "validation.every=0", "validation.num_samples=2", f"hydra.run.dir={run}"])
    deadline = time.time() + 120
    while not (run / "config.yaml").is_file() and time.time() < deadline:
        time.sleep(0.1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    watcher = subprocess.run([sys.executable, "-m", "distill.evaluate", str(run), "--prompts", str(prompts),
                              "--watch", "--poll-s", "0.2", "--idle-timeout-min", "3"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=400)
    assert training.wait(timeout=300) == 0, training.stderr.read()[-2000:]
    assert watcher.returncode == 0, watcher.stderr[-3000:]
    assert "checkpoint 12: videos=3" in watcher.stdout
    scored = sorted(int(p.name.split("-")[1]) for p in (run / "eval").iterdir() if (p / "metrics.json").is_file())
    assert scored[-1] == 12 and set(scored) <= {4, 8, 12}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "eval/videos" in r) == scored


@pytest.mark.multiprocess
def test_evaluation_during_training_on_one_and_two_ranks(prompts, tmp_path):
    """validation.evaluate.every on the live student; on 2 ranks each samples a share (3 videos:
    one rank pads its share, or the sharded forward would hang) and the videos equal 1 rank's."""
    from conftest import run_launch

    args = ["training.max_steps=4", "validation.every=0", "validation.evaluate.every=2",
            f"validation.evaluate.prompts={prompts}", "training.export_at_end=false"]
    one = train_here([*TINY, *args, f"hydra.run.dir={tmp_path / 'one'}"])
    two = tmp_path / "two"
    done = run_launch([*args, "launcher.nproc_per_node=2", f"hydra.run.dir={two}"])
    assert done.returncode == 0, done.stderr[-3000:]
    for run in (one, two):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["eval/videos"]) for r in records if "eval/videos" in r] == [(2, 3), (4, 3)]
        assert names(run / "eval" / "checkpoint-4") == ["a red ball-0.mp4", "the digit 3 moving left-0.mp4",
                                                         "the sea at night-0.mp4"]
    assert set(contents(two / "eval" / "checkpoint-2")) == set(contents(one / "eval" / "checkpoint-2"))


def test_the_slurm_dry_run_shows_the_watcher_beside_the_training_job(prompts, tmp_path):
    from conftest import run_launch

    done = run_launch(["launcher=slurm", "launcher.dry_run=true", "validation.evaluate.watcher=true",
                       f"validation.evaluate.prompts={prompts}", f"hydra.run.dir={tmp_path}"])
    assert done.returncode == 0, done.stderr
    training, watcher = done.stdout.split("# the evaluation watcher")
    assert "#SBATCH --ntasks-per-node=8" in training and "#SBATCH --job-name=distill\n" in training
    assert f"python -m distill.evaluate {tmp_path} --prompts {prompts} --watch" in watcher
    for line in ("#SBATCH --dependency=after:TRAINING_JOB", "#SBATCH --job-name=distill-eval",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1"):
        assert line in watcher
    refused = run_launch(["validation.evaluate.watcher=true", f"validation.evaluate.prompts={prompts}",
                          f"hydra.run.dir={tmp_path / 'local'}"])
    assert refused.returncode != 0 and "validation.evaluate.watcher=true: a job beside the run" in refused.stderr


def test_vbench_runs_through_its_api_in_local_mode(run, prompts, tmp_path, monkeypatch):
    """A stand-in of vbench 0.1.5's API (VBench(device, full_info_dir, output_path).evaluate(...),
    results in <output_path>/<name>_eval_results.json as {dimension: [score, per-video]}):
    custom prompts go by file name in custom-input mode, VBench's list in its standard mode."""
    import types

    from distill.config.schema import EvaluateConfig
    from distill.evaluation import metrics
    from distill.evaluation.prompts import items, read_prompts
    from distill.evaluation.vbench_dimensions import CUSTOM_DIMENSIONS

    calls = []

    class VBench:
        def __init__(self, device, full_info_dir, output_path):
            self.full_info, self.out = full_info_dir, Path(output_path)

        def evaluate(self, videos_path, name, prompt_list=(), dimension_list=None, local=False, mode="", **kw):
            calls.append(dict(videos=videos_path, prompts=prompt_list, dims=dimension_list, local=local, mode=mode,
                              full_info=self.full_info, cache=os.environ["VBENCH_CACHE_DIR"]))
            self.out.mkdir(parents=True, exist_ok=True)
            scores = {d: [0.5 + i / 100, []] for i, d in enumerate(dimension_list)}
            (self.out / f"{name}_eval_results.json").write_text(json.dumps(scores))

    fake = types.ModuleType("vbench")
    fake.VBench, fake.__file__ = VBench, str(tmp_path / "vbench" / "__init__.py")
    monkeypatch.setitem(sys.modules, "vbench", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "vbench" else None)
    (tmp_path / "cache").mkdir()
    cfg = EvaluateConfig(prompts=str(prompts), vbench_cache=str(tmp_path / "cache"))
    assert metrics.chosen(cfg) == ["vbench"]
    [vbench] = metrics.build(cfg, read_prompts(prompts), torch.device("cpu"))
    videos = [(item, None) for item in items(read_prompts(prompts), 1, 0)]
    scores = vbench(videos, tmp_path / "eval")
    call = calls[-1]
    assert call["mode"] == "custom_input" and call["local"] and call["cache"] == str(tmp_path / "cache")
    assert call["prompts"] == {"a red ball-0.mp4": "a red ball", "the digit 3 moving left-0.mp4":
                               "the digit 3 moving left", "the sea at night-0.mp4": "the sea at night"}
    assert call["dims"] == list(CUSTOM_DIMENSIONS) and call["videos"] == str(tmp_path / "eval" / "videos")
    assert scores["vbench/subject_consistency"] == 0.5 and len(scores) == len(CUSTOM_DIMENSIONS)
    listing = tmp_path / "VBench_full_info.json"
    listing.write_text(json.dumps([{"prompt_en": "a dog running", "dimension": ["dynamic_degree"]},
                                   {"prompt_en": "a red apple", "dimension": ["color", "dynamic_degree"]}]))
    cfg = EvaluateConfig(prompts=str(listing), vbench_cache=str(tmp_path / "cache"))
    [vbench] = metrics.build(cfg, read_prompts(listing), torch.device("cpu"))
    assert vbench([], tmp_path / "standard") == {"vbench/dynamic_degree": 0.5, "vbench/color": 0.51}
    assert calls[-1]["mode"] == "vbench_standard" and calls[-1]["full_info"] == str(listing)
    refused = metrics.problems(EvaluateConfig(prompts=str(prompts), vbench_cache=str(tmp_path / "cache"),
                                              vbench_dimensions=["color"]), read_prompts(prompts))
    assert refused == ["vbench_dimensions: color is not one custom prompts allow (aesthetic_quality, "
                       "background_consistency, dynamic_degree, human_action, imaging_quality, motion_smoothness, "
                       "overall_consistency, subject_consistency, temporal_flickering, temporal_style)"]


def test_the_demo_student_and_its_teacher_judged_on_the_same_digit_prompts(demo_run, tmp_path):
    """The digits metric on the shared demo run: 40 prompts (each digit 4 times), the 2-step
    student against its teacher at 2 Euler steps, both from the run folder."""
    lines = [f"the digit {d} moving {m}" for d in range(10) for m in ("left", "right", "up", "down")]
    (tmp_path / "digits.txt").write_text("\n".join(lines) + "\n")
    common = ["--prompts", str(tmp_path / "digits.txt"), "--metrics", "digits"]
    assert evaluate([str(demo_run), *common, "--out", str(tmp_path / "student")]) == 0
    assert evaluate([str(demo_run), *common, "--role", "teacher", "--steps", "2", "--out", str(tmp_path / "teacher")]) == 0
    student, teacher = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("student", "teacher"))
    assert student["seeds"] == teacher["seeds"] == [0] and student["prompts_sha256"] == teacher["prompts_sha256"]
    assert student["metrics"]["digits/accuracy"] > teacher["metrics"]["digits/accuracy"] + 0.1, (student, teacher)
