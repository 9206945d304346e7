import json

from stages import checkpoint, grpo_update
from stages.load_weights import load

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten


def _params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_save_load_round_trip_with_state(tiny, tmp_path):
    model, tokenizer = tiny
    optimizer = grpo_update.make_optimizer(1e-3)
    optimizer.init(model.trainable_parameters())
    path = checkpoint.save(
        model,
        tokenizer,
        tmp_path / "step-00000003",
        state={"step": 3, "data_position": 24, "optimizer": optimizer.state},
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    loaded, loaded_tokenizer = load(path)
    original, restored = _params(model), _params(loaded)
    assert original.keys() == restored.keys()
    for name in original:
        np.testing.assert_array_equal(restored[name], original[name])
    assert loaded_tokenizer.encode("2+2=") == tokenizer.encode("2+2=")
    state = checkpoint.load_state(path)
    assert state["step"] == 3 and state["data_position"] == 24
    saved_optimizer = dict(tree_flatten(state["optimizer"]))
    assert saved_optimizer.keys() == dict(tree_flatten(optimizer.state)).keys()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["torch_dtype"] == "float32"


def test_transformers_opens_checkpoint_with_same_logits(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = tiny
    path = checkpoint.save(model, tokenizer, tmp_path / "ckpt")
    hf_model = AutoModelForCausalLM.from_pretrained(path).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(path)
    ids = hf_tokenizer("3+4=12", return_tensors="pt").input_ids
    assert ids[0].tolist() == tokenizer.encode("3+4=12")
    with torch.no_grad():
        expected = hf_model(ids).logits.numpy()
    got = np.array(model(mx.array(ids.numpy())))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_mlx_lm_opens_checkpoint(tiny, tmp_path):
    import mlx_lm

    model, tokenizer = tiny
    path = checkpoint.save(model, tokenizer, tmp_path / "ckpt")
    reopened, _ = mlx_lm.load(str(path))
    tokens = mx.array([tokenizer.encode("1+1=")])
    np.testing.assert_allclose(np.array(reopened(tokens)), np.array(model(tokens)), atol=1e-6)


def test_latest_prune_and_overwrite(tiny, tmp_path):
    model, tokenizer = tiny
    for step in (5, 10, 15):
        checkpoint.save(model, tokenizer, checkpoint.step_dir(tmp_path, step), state={"step": step})
    (tmp_path / ".step-00000020.tmp-1").mkdir()  # an interrupted save is never "latest"
    assert checkpoint.latest(tmp_path).name == "step-00000015"
    deleted = checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-00000005"]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-00000010",
        "step-00000015",
    ]
    checkpoint.save(model, tokenizer, checkpoint.step_dir(tmp_path, 15), state={"step": 99})
    assert checkpoint.load_state(checkpoint.step_dir(tmp_path, 15))["step"] == 99


def test_load_state_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no trainer_state.json"):
        checkpoint.load_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        checkpoint.load_state(tmp_path)
