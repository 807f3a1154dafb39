"""Speed options: regional torch.compile (training.compile), whose compiled blocks
give the eager losses with one compiled graph for every block of every role; and
the attention backend (model.attention_backend)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, quiet, read_metrics

# validation at the training batch sizes (2, and 4 under CFG): no shapes of its own to compile
COMMON = ["training.max_steps=4", "validation.every=0", "validation.num_samples=2", "method.generator_update_interval=2",
          "checkpoint.every=0", "training.export_at_end=false", "validation.health.diversity_seeds=0"]


def launch(args, run):
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0", TORCH_LOGS="recompiles")
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *quiet([*COMMON, *args, f"hydra.run.dir={run}"])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    """The plain run both tests compare with: eager blocks, the default attention backend."""
    run = tmp_path_factory.mktemp("speed") / "eager"
    result = launch([], run)
    assert result.returncode == 0, result.stderr
    return run


def test_compiled_blocks_match_eager_and_compile_once_per_grad_mode_and_batch(eager_run, tmp_path):
    eager, compiled = eager_run, tmp_path / "compiled"
    r2 = launch(["training.compile=true"], compiled)
    assert r2.returncode == 0, r2.stderr
    a, b = read_metrics(eager), read_metrics(compiled)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in x:
            if key.startswith(("loss/", "grad_norm/")):
                assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-6), (x["step"], key)
    log = r2.stderr + r2.stdout
    recompiles = re.findall(r"\[(\d+)/(\d+)\] \[__recompiles\] Recompiling function (\w+)", log)
    # one code object (frame 0, the block's forward) for 2 blocks x 3 roles; new graphs only for
    # grad mode, batch size (2, and 4 under CFG) and eval mode (the final validation; its run-health
    # samples at other seeds are off here: their batch of 4 is one more shape)
    assert recompiles and {frame for frame, _, _ in recompiles} == {"0"}, recompiles
    assert len(recompiles) <= 3, recompiles
    reasons = re.findall(r"- \d+/\d+: (.*)", log)
    assert all("grad_mode" in r or "size mismatch at index 0" in r or "training == True" in r for r in reasons), reasons
    assert "Recompiling" not in log[log.index("step 2 "):log.index("step 4 ")]  # warm after two iterations


def test_attention_backend_is_set_on_every_role_and_checked_before_the_run(eager_run, tmp_path):
    from conftest import compose_config
    from distill.config import validate
    from distill.distributed import Runtime
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from distill.models import build_adapter
    from distill.roles import build_roles

    default = _AttentionBackendRegistry.get_active_backend()[0]
    config = validate(compose_config(["model.attention_backend=_native_math"]))
    roles = build_roles(config, build_adapter(config.model), Runtime())
    backends = {m.processor._attention_backend for r in roles.values() for m in r.module.modules() if hasattr(m, "processor")}
    assert {str(getattr(b, "value", b)) for b in backends} == {"_native_math"}
    # only the roles': networks built later in this process keep diffusers' default
    assert _AttentionBackendRegistry.get_active_backend()[0] == default
    math_run, default_run = tmp_path / "math", eager_run
    assert launch(["model.attention_backend=_native_math"], math_run).returncode == 0
    for x, y in zip(read_metrics(default_run), read_metrics(math_run)):
        assert y["loss/critic"] == pytest.approx(x["loss/critic"], rel=1e-4)
    for name, message in (("flash", "not usable here"), ("nope", "allowed values are flash")):
        result = launch([f"model.attention_backend={name}"], tmp_path / name)
        assert result.returncode == 2 and f"model.attention_backend={name}: {message}" in result.stderr, result.stderr
        assert not (tmp_path / name).exists()
