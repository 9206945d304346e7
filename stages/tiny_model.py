"""The built-in tiny Qwen3: a real HF-format model directory the project makes itself.

Nothing is downloaded. `build(path)` writes config.json, model.safetensors (mlx-lm's writer, HF
tensor names), a character-level tokenizer built with the `tokenizers` library and saved through
transformers (tokenizer.json + tokenizer_config.json with a chat template), and
generation_config.json. `stages.load_weights.load("builtin:tiny_qwen3")` builds it once into the
cache and then loads it through the same mlx-lm path as any downloaded checkpoint.

Random weights learn the quickstart task too slowly by pure RL (the right first token is rare),
so the build ends with a short supervised *format* warm-up: 40 Adam steps on
"<prompt><digit><eos>" where the digit is the prompt's first operand half the time and a random
digit otherwise. It teaches "read the prompt, answer with one digit, then stop" but never the
sum: the built model scores about 0.11 on the quickstart reward (chance is 1/9), and GRPO has to
learn the addition.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from stages.data import arithmetic_rows
from stages.hf_format import hf_weights, save_weights

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.utils import _get_classes, save_config

PAD, UNK, IM_START, EOS = "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, UNK, IM_START, EOS]
CHARACTERS = list("0123456789+-*/=?:.,()# \nabcdefghijklmnopqrstuvwxyz")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# HF config.json of the tiny model (Qwen3ForCausalLM; transformers and mlx-lm both read it).
TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "bos_token_id": None,
    "torch_dtype": "float32",
}

# The same tiny shape as a Qwen3-MoE (4 experts, top-2; untied embeddings as in Qwen3-30B-A3B),
# in HF config names that both transformers and mlx-lm read.
TINY_QWEN3_MOE = {
    **{k: v for k, v in TINY_QWEN3.items() if k not in ("architectures", "model_type")},
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 96,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}

BUILTINS = {"tiny_qwen3": TINY_QWEN3, "tiny_qwen3_moe": TINY_QWEN3_MOE}
# Bump when the build changes, so stale cached builds are not reused.
BUILD_VERSION = 1
WARMUP_STEPS = 40


def cache_root() -> Path:
    """Where built-in models are built: $MLX_GRPO_CACHE, else ~/.cache/mlx-grpo."""
    root = os.environ.get("MLX_GRPO_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mlx-grpo"


def build_tokenizer():
    """A character-level tokenizer (one token per character, specials matched whole)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=TINY_QWEN3["max_position_embeddings"],
    )


def _format_warmup(model: nn.Module, hf_tokenizer, seed: int) -> None:
    """Teach "one digit, then EOS" after an arithmetic prompt; the digit is random."""
    rng = np.random.default_rng(seed)
    rows = arithmetic_rows(512, seed=seed + 1)
    eos_id = hf_tokenizer.convert_tokens_to_ids(EOS)
    optimizer = optim.Adam(learning_rate=3e-3)

    def loss_fn(model, inputs, targets, weights):
        logits = model(inputs)
        losses = nn.losses.cross_entropy(logits, targets, reduction="none")
        return (losses * weights).sum() / weights.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    for step in range(WARMUP_STEPS):
        batch = [rows[i] for i in rng.choice(len(rows), size=32, replace=False)]
        sequences, prompt_lengths = [], []
        for row in batch:
            prompt = hf_tokenizer.encode(row["prompt"])
            # Half the time the first operand (teaches reading the prompt), else a random digit.
            target = row["prompt"][0] if rng.random() < 0.5 else str(rng.integers(0, 10))
            digit = hf_tokenizer.convert_tokens_to_ids(target)
            sequences.append(prompt + [digit, eos_id])
            prompt_lengths.append(len(prompt))
        width = max(map(len, sequences))
        tokens = np.zeros((len(batch), width), dtype=np.int32)
        weights = np.zeros((len(batch), width - 1), dtype=np.float32)
        for i, (seq, n_prompt) in enumerate(zip(sequences, prompt_lengths)):
            tokens[i, : len(seq)] = seq
            weights[i, n_prompt - 1 : len(seq) - 1] = 1.0  # only the answer and EOS positions
        tokens = mx.array(tokens)
        loss, grads = loss_and_grad(model, tokens[:, :-1], tokens[:, 1:], mx.array(weights))
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        del step, loss


def build(path: str | Path, name: str = "tiny_qwen3", seed: int = 0) -> Path:
    """Write the built-in model `name` as an HF-format directory at `path`."""

    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    config = dict(BUILTINS[name])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_tokenizer = build_tokenizer()
    config["eos_token_id"] = hf_tokenizer.convert_tokens_to_ids(EOS)
    config["pad_token_id"] = hf_tokenizer.convert_tokens_to_ids(PAD)

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    _format_warmup(model, hf_tokenizer, seed)

    save_weights(path, hf_weights(model))  # HF names and layout (experts un-stacked)
    save_config(config, path / "config.json")
    hf_tokenizer.save_pretrained(path)
    generation = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return path


def builtin_path(name: str) -> Path:
    """The cached build of built-in model `name`, building it on first use (a few seconds)."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    key = json.dumps([BUILD_VERSION, BUILTINS[name], CHARACTERS, WARMUP_STEPS], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    target = cache_root() / f"{name}-{digest}"
    if (target / "config.json").exists():
        return target
    # Build beside the target and rename, so a crash never leaves a half-built model behind.
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    build(staging, name)
    try:
        staging.rename(target)
    except OSError:  # another process finished first; use its build
        shutil.rmtree(staging, ignore_errors=True)
    return target
