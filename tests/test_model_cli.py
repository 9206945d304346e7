"""End-to-end: LoRA on the built-in tiny Qwen3-MoE with a KL reference, resume, fuse; bad
model inputs fail before training with one line."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests.test_cli import SHRUNK, run_grpo

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_prefect")]

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.slow
def test_lora_moe_run_resumes_and_fuses(tmp_path):
    lora_run = (
        *SHRUNK,
        "model=tiny_moe",
        "model.lora.enabled=true",
        "model.lora.rank=4",
        "model.lora.target_modules=[q_proj,v_proj,switch_mlp.up_proj]",
        "train.beta=0.04",
        "train.gradient_checkpointing=true",
    )
    first = run_grpo(tmp_path, *lora_run, "train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    step2 = tmp_path / "outputs/quickstart/checkpoints/step-00000002"
    assert (step2 / "adapters.safetensors").exists()
    assert not list(step2.glob("model*.safetensors"))
    config = json.loads((step2 / "adapter_config.json").read_text())
    assert config["lora_parameters"]["keys"] == [
        "mlp.switch_mlp.up_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]

    second = run_grpo(tmp_path, *lora_run, "run.resume=latest", "model.fuse_lora_at_end=true")
    assert second.returncode == 0, second.stderr[-3000:]
    fused = tmp_path / "outputs/quickstart/fused"
    assert f"fused model: {Path('outputs/quickstart/fused')}" in second.stdout or str(fused) in (
        second.stdout
    )
    names = set(mx.load(str(fused / "model.safetensors")))
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in names
    assert not [n for n in names if "lora" in n or "switch_mlp" in n]

    from stages import lora
    from stages.load_weights import load

    import mlx_lm

    # fused == base + the step-4 adapters
    step4 = tmp_path / "outputs/quickstart/checkpoints/step-00000004"
    adapted, _ = load("builtin:tiny_qwen3_moe", dtype="float32")
    lora.load_adapters(adapted, step4)
    reopened, _ = mlx_lm.load(str(fused))
    tokens = mx.array([[5, 9, 14, 3, 22, 7]])
    np.testing.assert_allclose(np.array(reopened(tokens)), np.array(adapted(tokens)), atol=1e-4)


@pytest.mark.slow
def test_bad_model_inputs_fail_before_training(tmp_path):
    moe = tmp_path / "moe"
    shutil.copytree(FIXTURES / "qwen3_moe_tiny", moe)
    config = json.loads((moe / "config.json").read_text())
    config["moe_intermediate_size"] = 12
    (moe / "config.json").write_text(json.dumps(config))
    result = run_grpo(tmp_path, *SHRUNK, f"model.path={moe}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(moe / "model.safetensors") in lines[0]
    assert "weights do not fit config.json" in lines[0]

    plain = tmp_path / "plain"
    shutil.copytree(FIXTURES / "qwen3_tiny", plain)
    (plain / "chat_template.jinja").unlink()
    result = run_grpo(tmp_path, *SHRUNK, f"model.path={plain}", "data.use_chat_template=true")
    assert result.returncode == 2
    assert "tokenizer_config.json has no chat_template" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
