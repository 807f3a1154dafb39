import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from distill.config import register_configs
from distill.config.sweeps import register_sweeps

ROOT = Path(__file__).resolve().parents[1]
register_configs()
register_sweeps(ROOT / "sweeps")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """How `--dist loadgroup` shares the tests between the xdist workers:
    - tests that start several processes (marked `multiprocess`, or using the SLURM
      cluster) form one group: they run one after another on one worker, never beside
      each other, while the other worker runs the rest;
    - tests that share a module-scoped fixture run on one worker, so that it is built
      once (a fixture shared across workers is session-scoped, through `built_once`);
    - the readers of the shared demo run too: spread over both workers, one of them
      sat idle for minutes waiting on the other's build (165 s, measured);
    - every other test goes to whichever worker is free.
    tryfirst: xdist reads the group marks in its own hook of this name."""
    for item in items:
        if item.get_closest_marker("multiprocess") or "slurm" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("multiprocess"))
        elif "demo_run" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("demo_run"))
        elif any(d.scope == "module" for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def quiet(overrides):
    """Tests run the tiny plumbing config and log to files only, unless a test
    picks an experiment or a logger itself; every run trains on one torch thread,
    since the two xdist workers already keep both cores busy (the demo's 2 threads
    beside another worker's run oversubscribe the cores and slow both)."""
    overrides = list(overrides)
    if not any(o.lstrip("+~").startswith("training.torch_threads") for o in overrides):
        overrides.append("training.torch_threads=1")
    if not any(o.lstrip("+~").startswith("logger") for o in overrides):
        overrides.append("logger=none")
    if not any(o.lstrip("+~").startswith("experiment") for o in overrides):
        overrides.append("experiment=tiny")
    return overrides


def compose_config(overrides=()):
    """The config `python launch.py <overrides>` would compose (logger=none unless given)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=quiet(overrides))


def launch_as_typed(args, cwd=None, timeout=300):
    """launch.py exactly as typed: no overrides added."""
    # PYTHONFAULTHANDLER: a launch that hangs is stopped with SIGABRT, so its stderr ends with
    # every thread's stack, which the failure shows
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0", PYTHONFAULTHANDLER="1")
    with subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd or ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            out, err = process.communicate()
            raise AssertionError(f"launch.py {' '.join(args)} ran past {timeout}s; its stacks:\n{err[-6000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_launch(args, cwd=None, timeout=300):
    """launch.py with the tests' defaults (`quiet`) added."""
    return launch_as_typed(args if "--cfg" in args else quiet(args), cwd, timeout)


def train_here(args) -> Path:
    """A one-rank run in this process, where `run_launch(args)` would start one: the same
    config (the tests' defaults added) and the same `train` launch.py calls, into the folder
    hydra.run.dir names, without a new process's ~7 s of imports. For reference runs that
    tests compare within a tolerance (records, exports, samples): a run that must equal
    another bit for bit is launched like it, since this process's state (threads, an
    attention backend an earlier test chose) is the test worker's."""
    from distill.config import validate
    from distill.config.io import save_config
    from distill.run import train
    from distill.worker import CONFIG_FILE

    run = Path(next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")))
    config = validate(compose_config([a for a in args if not a.startswith("hydra.")]))
    run.mkdir(parents=True, exist_ok=True)
    save_config(config, run / CONFIG_FILE)  # as launch.py writes it
    train(config, run)
    return run


def launch_background(args):
    """launch.py (tiny, no wandb unless given) in its own session, so that a test can signal or kill it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *quiet(args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_records(run_dir: Path, count: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        file = run_dir / "metrics.jsonl"
        if file.is_file() and len(file.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} never logged {count} records")


def read_metrics(run_dir: Path, validation: bool = False):
    """The training records of metrics.jsonl (or, with validation=True, the validation ones)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if any(k.startswith("val/") for k in r) == validation]


@pytest.fixture(scope="session")
def built_once(tmp_path_factory):
    """`built_once(name, make)` -> a folder that `make(folder)` filled once per test
    session: the first xdist worker to ask builds it under a file lock, the other
    waits and reads the same folder. For expensive fixtures (trained runs, model
    folders) that tests only read."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker has its own basetemp below the session's
    root = root / "built-once"
    root.mkdir(exist_ok=True)

    def build(name: str, make) -> Path:
        folder, complete = root / name, root / f"{name}.complete"
        with FileLock(root / f"{name}.lock"):
            if not complete.is_file():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                make(folder)
                complete.touch()
        return folder

    return build


# The one short demo run of the suite: `python launch.py` (the embedded default: DMD2
# with its GAN term), shortened to half its iterations. Its quality is asserted in
# test_demo.py (against the teacher at 50 steps, the demo's claim, and at the student's
# 2 steps, sampled in any case); its log lines, samples, grids, printed table, export,
# sampling by prompt and relaunch are read by the tests of what a user sees.
DEMO_SHORT = ["training.max_steps=750", "validation.every=250", "validation.num_samples=128",
              "validation.teacher_steps=50", "checkpoint.every=100000"]


@pytest.fixture(scope="session")
def demo_run(built_once) -> Path:
    """The run folder of the short demo run (its console output in stdout.txt beside it)."""
    def make(folder):
        # exactly the default launch: no experiment named (run_launch would add the tiny one)
        args = [*DEMO_SHORT, "logger=none", "training.torch_threads=1", f"hydra.run.dir={folder / 'run'}"]
        result = launch_as_typed(args, timeout=1800)
        (folder / "stdout.txt").write_text(result.stdout)
        assert result.returncode == 0, result.stderr

    return built_once("demo", make) / "run"


def validation_scores(run: Path) -> dict:
    """The latest value of every validation metric of a run ('student_2step/accuracy', ...;
    the teacher's from the first validation), and the student's averaged over the last
    two validations as 'student_last2/...'."""
    records = read_metrics(run, validation=True)
    scores = {k.split("/", 1)[1]: v for r in records for k, v in r.items() if k.startswith("val/")}
    last2 = [r for r in records if "val/student_2step/accuracy" in r][-2:]
    for key in ("accuracy", "frechet_distance"):
        scores[f"student_last2/{key}"] = sum(r[f"val/student_2step/{key}"] for r in last2) / len(last2)
    return scores


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Wan transformer written with save_pretrained, as a diffusers folder."""
    from distill.config import validate
    from distill.models import build_adapter

    config = validate(compose_config())
    module = build_adapter(config.model).load(None, seed=123)
    folder = tmp_path / "tiny-wan"
    module.save_pretrained(folder / "transformer")
    return folder


WORDS = ["<pad>", "<unk>", "a", "red", "blue", "square", "moves", "left", "right"]


def write_tiny_pipeline_parts(folder: Path, wan22: bool = False) -> Path:
    """A tiny Wan VAE (16 latent channels, 8x spatial; with `wan22` the Wan2.2 layout:
    48 channels, 16x spatial, residual, patchified), umT5 encoder (width 32) and
    word-level tokenizer, saved as the vae/, text_encoder/ and tokenizer/ of a diffusers folder."""
    import torch
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = dict(z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2, decoder_base_dim=8,
               scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48) if wan22 else dict(z_dim=16)
    AutoencoderKLWan(base_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1, **vae).save_pretrained(folder / "vae")
    UMT5EncoderModel(
        UMT5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    ).save_pretrained(folder / "text_encoder")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder / "tokenizer")
    return folder


def write_tiny_qwen_image_parts(folder: Path) -> Path:
    """A tiny Qwen-Image VAE (4 latent channels, 8x spatial), Qwen2.5-VL text encoder
    (width 32, as model=qwen_image_tiny's text_dim) and word-level tokenizer with the
    chat template's special tokens, saved as the vae/, text_encoder/ and tokenizer/ of
    a diffusers folder."""
    import torch
    from diffusers import AutoencoderKLQwenImage
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).save_pretrained(folder / "vae")
    special = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate([*WORDS, *special, "\n"])}
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]})
    vision = dict(depth=1, hidden_size=16, out_hidden_size=32, num_heads=2, intermediate_size=32, fullatt_block_indexes=[0])
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).save_pretrained(
        folder / "text_encoder")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # words, punctuation runs and line breaks: the pipeline's chat template before the prompt is
    # then 34 tokens, as Qwen2.5-VL's tokenizer makes it (the pipeline drops those 34)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("[ \t]+"), "removed"),
                                                 pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), "isolated")])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                            additional_special_tokens=special).save_pretrained(folder / "tokenizer")
    return folder


def write_tiny_family(folder: Path, preset: str, write_parts) -> Path:
    """A tiny family's diffusers folder: the transformer of `model=<preset>` (random weights,
    seed 5) beside the parts `write_parts(folder)` writes."""
    from distill.config import validate
    from distill.models import build_adapter

    module = build_adapter(validate(compose_config([f"model={preset}"])).model).load(None, seed=5)
    module.save_pretrained(folder / "transformer")
    return write_parts(folder)


def write_tiny_ltx2_parts(folder: Path) -> Path:
    """A tiny LTX-2 video VAE (8 latent channels, 8x spatial, 2x temporal), audio VAE (16 mel
    bins -> 2 channels x 4, 4x in time, as the pipeline assumes), vocoder, Gemma-3 (width 16,
    one layer), text connectors (4 learnable registers, as LTX-2.0 has 128) and word-level
    tokenizer, saved as the parts of a diffusers LTX-2 folder; model=ltx2_tiny's shapes."""
    import torch
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, PreTrainedTokenizerFast

    torch.manual_seed(0)
    AutoencoderKLLTX2Video(latent_channels=8, block_out_channels=(8,), decoder_block_out_channels=(8,),
                           layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
                           decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False),
                           downsample_type=("spatiotemporal",), upsample_residual=(False,), upsample_factor=(1,),
                           patch_size=4, decoder_causal=False).save_pretrained(folder / "vae")
    # base_channels = channels x latent mel bins: the width of the audio statistics the pipeline applies
    AutoencoderKLLTX2Audio(base_channels=8, ch_mult=(1, 2, 4), num_res_blocks=1, latent_channels=2,
                           mel_bins=16).save_pretrained(folder / "audio_vae")
    LTX2Vocoder(in_channels=2 * 16, hidden_channels=8, out_channels=2, upsample_kernel_sizes=[4, 4],
                upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
                output_sampling_rate=16000).save_pretrained(folder / "vocoder")
    text = dict(vocab_size=len(WORDS) + 2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                boi_token_index=len(WORDS), eoi_token_index=len(WORDS),
                                                image_token_index=len(WORDS) + 1)).save_pretrained(folder / "text_encoder")
    connector = dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, num_learnable_registers=4)
    LTX2TextConnectors(caption_channels=16, text_proj_in_factor=2, connector_rope_base_seq_len=32,
                       **{f"{stream}_connector_{key}": value for stream in ("video", "audio")
                          for key, value in connector.items()}).save_pretrained(folder / "connectors")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder / "tokenizer")
    return folder


def write_sounding_clip(path: Path, frames: int, size: int = 32, fps: float = 24, tone: Optional[float] = None,
                        seed: int = 0, rate: int = 22050) -> None:
    """A clip of random frames (mpeg4) and, where `tone` is given, a stereo sine at `tone` Hz
    (16-bit PCM at `rate`, 0.1 s longer than the frames) in a Matroska file."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("pcm_s16le", rate=rate, layout="stereo") if tone is not None else None
        for _ in range(frames):
            image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        if sound is not None:
            t = np.arange(int(rate * (frames / fps + 0.1))) / rate
            wave = (0.5 * np.sin(2 * np.pi * tone * t) * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(np.stack([wave, wave], 1).reshape(1, -1), format="s16", layout="stereo")
            frame.sample_rate = rate
            container.mux(sound.encode(frame))
            container.mux(sound.encode())


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A two-node SLURM cluster on this machine for the whole session."""
    from slurm_cluster import LocalSlurm, available

    why = available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {why}")
        pytest.skip(f"{why}; CI runs these")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


TIMING_KEYS = {"step_time", "samples_per_s", "peak_memory_gb"}


def exported_weights(run: Path, role: str, subfolder: str = "transformer") -> dict:
    from safetensors.torch import load_file

    return load_file(run / "export" / role / subfolder / "diffusion_pytorch_model.safetensors")


def assert_runs_match(run: Path, ref: Path, roles=("student", "critic"), subfolders=("transformer",),
                      abs_tol: float = 1e-7) -> None:
    """A run equals a reference up to float reordering (other ranks, other layouts): the
    same steps, every loss and grad norm within 1e-5 relative (abs_tol absolute), and the
    exported roles' weights within 1e-5."""
    ours, theirs = read_metrics(run), read_metrics(ref)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        for key in b:
            if key.startswith(("loss/", "grad_norm/")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=abs_tol), (b["step"], key)
    for role in roles:
        for sub in subfolders:
            mine, want = exported_weights(run, role, sub), exported_weights(ref, role, sub)
            assert max((mine[k] - want[k]).abs().max().item() for k in want) <= 1e-5, (role, sub)


def assert_bit_identical_runs(a: Path, b: Path, roles=("student", "critic", "student_ema")) -> None:
    """Two runs' records equal step for step (timings aside) and their exported roles bit for bit."""
    import torch

    x, y = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in x] == [r["step"] for r in y]
    for r, s in zip(x, y):
        assert {k: v for k, v in r.items() if k not in TIMING_KEYS} == {k: v for k, v in s.items() if k not in TIMING_KEYS}
    for role in roles:
        wa, wb = exported_weights(a, role), exported_weights(b, role)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), role
