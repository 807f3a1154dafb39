"""The families beyond Wan through launch.py: DMD2 with the GAN term and LoRA
finetuning of Qwen-Image (images) and LTX-2 (audio + video), 2 ranks against 1,
and a stopped run resumed bit for bit."""

import math

import pytest
from safetensors.torch import load_file

from conftest import assert_bit_identical_runs, assert_runs_match, read_metrics, run_launch, train_here

CASES = {
    # DMD2 with the GAN head on the critic's last block (the image / video stream's tokens).
    # A learning rate of 1e-3: Adam turns the ranks' float reordering of near-zero gradients
    # into weight differences in proportion to it (5e-5 at 1e-2, over the 1e-5 compared)
    "dmd2_gan": ["method.gan.enabled=true", "method.generator_update_interval=2", "method.generator_lr=1e-3",
                 "method.critic_lr=1e-3"],
    # plain flow matching of the student's adapters only
    "finetune_lora": ["method=finetune", "method.lr=1e-2", "roles.student.lora.rank=4"],
}
# a module each family's LoRA must adapt: Qwen's text-stream MLP, LTX-2's audio attention
ADAPTED = {"qwen_image_tiny": "transformer_blocks.1.txt_mlp.net.2",
           "ltx2_tiny": "transformer_blocks.1.audio_attn1.to_k"}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model", list(ADAPTED))
def test_two_ranks_equal_one_and_a_resumed_run_is_bit_identical(model, case, tmp_path):
    """2 ranks x batch 2 equal 1 rank x batch 4 within 1e-5; 3 steps, then a restart to 6,
    equal 6 straight bit for bit (both in this process, one after the other)."""
    common = [f"model={model}", *CASES[case], "validation.num_samples=2", "validation.health.diversity_seeds=0"]
    one, resumed, two = tmp_path / "one", tmp_path / "resumed", tmp_path / "two"
    train_here([*common, "data.batch_size=4", "training.max_steps=6", f"hydra.run.dir={one}"])
    train_here([*common, "data.batch_size=4", "training.max_steps=3", f"hydra.run.dir={resumed}"])
    train_here([*common, "data.batch_size=4", "training.max_steps=6", f"hydra.run.dir={resumed}"])
    result = run_launch([*common, "data.batch_size=2", "launcher.nproc_per_node=2", "training.max_steps=6",
                         f"hydra.run.dir={two}"])
    assert result.returncode == 0, result.stderr
    roles = ("student",) if case == "finetune_lora" else ("student", "critic")
    assert_runs_match(two, one, roles=roles)
    a, b = read_metrics(one), read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert_bit_identical_runs(one, resumed, roles=roles)
    if case == "dmd2_gan":
        for term in ("gan/discriminator", "gan/generator"):  # both sides of the GAN term ran and logged
            values = [r[term] for r in a if term in r]
            assert values and all(math.isfinite(v) and v > 0 for v in values), term
    else:  # only the adapters trained: the checkpoint holds them alone
        state = load_file(next((one / "checkpoint-6" / "state").glob("*.safetensors")))
        weights = [k for k in state if k.startswith("role.student/model/")]
        assert weights and all(".lora_" in k for k in weights)
        assert ADAPTED[model] in {k.split("role.student/model/")[1].split(".lora_")[0] for k in weights}
        assert (one / "export" / "student" / "lora" / "pytorch_lora_weights.safetensors").is_file()
