"""Make the golden parity fixtures under tests/fixtures/ (run by hand; needs torch + transformers).

    ./dev python scripts/make_golden_fixtures.py

For each of a tiny random Qwen3 (dense, untied embeddings) and a tiny random Qwen3-MoE (8
experts, top-2, one dense `mlp_only_layers` block between two sparse ones), transformers builds
the model from a seeded random init, saves it with `save_pretrained` (float32 safetensors, HF
names and layout, config.json, generation_config.json) next to the project's character tokenizer,
and records its logits for fixed token ids:

    tests/fixtures/<name>/                  the HF model directory
    tests/fixtures/<name>/golden_input_ids.npy    (2, 12) int32
    tests/fixtures/<name>/golden_logits.npy       (2, 12, 64) float32, transformers' forward

The tests (tests/test_parity.py) load the directory through our loader and compare logits
without torch. RMSNorm weights are randomised too (transformers initialises them to 1), so a
norm convention mismatch would show.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.tiny_model import build_tokenizer  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
COMMON = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,  # != hidden_size / heads, as in the real Qwen3 checkpoints
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "bos_token_id": None,
}
MODELS = {
    "qwen3_tiny": (Qwen3Config, Qwen3ForCausalLM, {"num_hidden_layers": 2}),
    "qwen3_moe_tiny": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        {
            "num_hidden_layers": 3,
            "moe_intermediate_size": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [1],
            "norm_topk_prob": True,
        },
    ),
}


def make(name: str, seed: int = 0) -> Path:
    config_cls, model_cls, extra = MODELS[name]
    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    pad = tokenizer.convert_tokens_to_ids(tokenizer.pad_token)
    config = config_cls(**COMMON, **extra, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    target = FIXTURES / name
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)

    rng = np.random.default_rng(seed)
    input_ids = rng.integers(4, COMMON["vocab_size"], size=(2, 12)).astype(np.int32)
    with torch.no_grad():
        logits = model(torch.from_numpy(input_ids.astype(np.int64))).logits.float().numpy()
    np.save(target / "golden_input_ids.npy", input_ids)
    np.save(target / "golden_logits.npy", logits.astype(np.float32))
    sizes = {p.name: p.stat().st_size for p in sorted(target.iterdir())}
    print(f"{name}: {json.dumps(sizes)}")
    return target


if __name__ == "__main__":
    for model_name in MODELS:
        make(model_name)
