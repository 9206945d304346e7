"""The built-in tiny Qwen3: a real HF-format model directory the project makes itself.

Nothing is downloaded. `build(path)` writes config.json, model.safetensors (mlx-lm's writer, HF
tensor names), a character-level tokenizer built with the `tokenizers` library and saved through
transformers (tokenizer.json + tokenizer_config.json with a chat template), and
generation_config.json. `stages.load_weights.load("builtin:tiny_qwen3")` builds it once into the
cache and then loads it through the same mlx-lm path as any downloaded checkpoint. The tools
model, whose warm-up takes about 2 minutes, ships built in `builtin_models/` (`ship`) and is
copied into the cache instead, while its recipe is the one it was built from.

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

# The tools quickstart's model: the tiny Qwen3 with Qwen3's tool tokens, the characters of
# JSON and error messages, a Qwen3-style chat template that renders tools, tool calls and tool
# results (compactly: the model reads characters), and room for a few turns.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
TOOL_CHARACTERS = CHARACTERS + list("{}\"'_<>[]!|ABCDEFGHIJKLMNOPQRSTUVWXYZ")
TINY_QWEN3_TOOLS = {**TINY_QWEN3, "vocab_size": 128, "max_position_embeddings": 512}

TOOLS_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n{% endif %}"
    "tools:{% for tool in tools %} {{ tool['function']['name'] }}{% endfor %}<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user\n"
    "{% endif %}<tool_response>{{ message['content'] }}</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif message['role'] == 'assistant' %}<|im_start|>assistant\n{{ message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}"
    '<tool_call>{"name":"{{ call["function"]["name"] }}","arguments":'
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson(separators=(',', ':')) }}{% endif %}"
    "}</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BUILTINS = {
    "tiny_qwen3": TINY_QWEN3,
    "tiny_qwen3_moe": TINY_QWEN3_MOE,
    "tiny_qwen3_tools": TINY_QWEN3_TOOLS,
}
# Bump when the build changes, so stale cached builds are not reused.
BUILD_VERSION = 1
WARMUP_STEPS = 40
# The tools model's warm-up (its own cache key: the other built-ins' builds are unchanged).
TOOLS_BUILD_VERSION = 1
TOOLS_WARMUP = {"steps": 600, "batch": 32, "learning_rate": 3e-3, "digit_noise": 0.25}


def cache_root() -> Path:
    """Where built-in models are built: $MLX_GRPO_CACHE, else ~/.cache/mlx-grpo."""
    root = os.environ.get("MLX_GRPO_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mlx-grpo"


def build_tokenizer(tools: bool = False):
    """A character-level tokenizer (one token per character, specials matched whole). `tools`:
    the tools model's (Qwen3's tool tokens, more characters, a template that renders tools)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    added = TOOL_TOKENS if tools else []
    characters = TOOL_CHARACTERS if tools else CHARACTERS
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + added + characters)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    if added:
        tokenizer.add_tokens(added)  # matched whole, kept in decoded text (as Qwen3's)
    config = TINY_QWEN3_TOOLS if tools else TINY_QWEN3
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=TOOLS_CHAT_TEMPLATE if tools else CHAT_TEMPLATE,
        model_max_length=config["max_position_embeddings"],
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


def _noisy(number: int, rng, noise: float) -> int:
    """`number` with each decimal digit replaced by a random one with probability `noise` (the
    first digit stays non-zero, so the number keeps its length)."""
    digits = []
    for i, digit in enumerate(str(number)):
        if rng.random() < noise:
            digit = str(rng.integers(1 if i == 0 else 0, 10))
        digits.append(digit)
    return int("".join(digits))


def _tool_warmup_example(hf_tokenizer, row: dict, rng, schemas: list[dict]):
    """One warm-up conversation in the rollout's token layout: (tokens, weights), weights 1 on
    the assistant's tokens (the call turn and the answer turn, each with its EOS).

    The call has the chat template's syntax and the prompt's operands as arguments, the answer
    is the tool's result, but every digit of the arguments and of the answer is replaced by a
    random digit with probability `digit_noise`; the tool message holds the add tool's real
    result for the arguments written. So the model learns the syntax of a call and of an
    answer and to read the prompt and the tool's result, but not reliably: at first fewer
    than one answer in ten is right, and GRPO has to make it exact."""
    from stages.tools import add, tool_suffix_ids

    noise = TOOLS_WARMUP["digit_noise"]
    a, b = (int(x) for x in row["prompt"].rstrip("=").split("+"))
    args = {"a": _noisy(a, rng, noise), "b": _noisy(b, rng, noise)}
    result = add(**args)
    answer = _noisy(result, rng, noise)
    messages = [{"role": "user", "content": row["prompt"]}]
    prompt = list(
        hf_tokenizer.apply_chat_template(
            messages, tools=schemas, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    call = {"type": "function", "function": {"name": "add", "arguments": args}}
    call_text = hf_tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "", "tool_calls": [call]}],
        tools=schemas,
        tokenize=False,
    )
    call_text = call_text.split("<|im_start|>assistant\n")[-1].removesuffix(f"{EOS}\n")
    eos_id = hf_tokenizer.convert_tokens_to_ids(EOS)
    call_ids = hf_tokenizer.encode(call_text) + [eos_id]
    suffix = tool_suffix_ids(
        hf_tokenizer, [{"role": "tool", "name": "add", "content": str(result)}]
    )
    answer_ids = hf_tokenizer.encode(str(answer)) + [eos_id]
    tokens = prompt + call_ids + suffix + answer_ids
    weights = [0.0] * len(prompt) + [1.0] * len(call_ids) + [0.0] * len(suffix)
    weights += [1.0] * len(answer_ids)
    return tokens, weights


def _tools_warmup(model: nn.Module, hf_tokenizer, seed: int) -> None:
    """Teach the syntax of an `add` call and of an answer after the tool's result (see
    _tool_warmup_example); next-token loss on the assistant's tokens only."""
    from stages.data import tool_arithmetic_rows
    from stages.tools import add, tool_schema

    rng = np.random.default_rng([seed, 7])
    rows = tool_arithmetic_rows(512, seed=seed + 1)
    schemas = [tool_schema(add)]
    optimizer = optim.Adam(learning_rate=TOOLS_WARMUP["learning_rate"])

    def loss_fn(model, inputs, targets, weights):
        losses = nn.losses.cross_entropy(model(inputs), targets, reduction="none")
        return (losses * weights).sum() / weights.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    for _ in range(TOOLS_WARMUP["steps"]):
        chosen = rng.choice(len(rows), size=TOOLS_WARMUP["batch"], replace=False)
        examples = [_tool_warmup_example(hf_tokenizer, rows[i], rng, schemas) for i in chosen]
        width = max(len(t) for t, _ in examples)
        tokens = np.zeros((len(examples), width), dtype=np.int32)
        weights = np.zeros((len(examples), width), dtype=np.float32)
        for i, (seq, w) in enumerate(examples):
            tokens[i, : len(seq)] = seq
            weights[i, : len(w)] = w
        tokens = mx.array(tokens)
        # weights[t] marks token t as a target: it is predicted at position t - 1
        _, grads = loss_and_grad(model, tokens[:, :-1], tokens[:, 1:], mx.array(weights[:, 1:]))
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)


def build(path: str | Path, name: str = "tiny_qwen3", seed: int = 0) -> Path:
    """Write the built-in model `name` as an HF-format directory at `path`."""

    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    config = dict(BUILTINS[name])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tools = name == "tiny_qwen3_tools"
    hf_tokenizer = build_tokenizer(tools=tools)
    config["eos_token_id"] = hf_tokenizer.convert_tokens_to_ids(EOS)
    config["pad_token_id"] = hf_tokenizer.convert_tokens_to_ids(PAD)

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    if tools:
        _tools_warmup(model, hf_tokenizer, seed)
    else:
        _format_warmup(model, hf_tokenizer, seed)

    save_weights(path, hf_weights(model))  # HF names and layout (experts un-stacked)
    save_config(config, path / "config.json")
    hf_tokenizer.save_pretrained(path)
    generation = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return path


# Built-ins that ship built, in this package (`ship`): the tools model's warm-up takes about 2
# minutes on 2 cores, its 0.4 MB of weights none. Each folder's recipe.json names the recipe digest
# it was built from; a changed recipe (another digest) is built again on first use instead.
SHIPPED = Path(__file__).resolve().parent / "builtin_models"
SHIPPED_NAMES = ("tiny_qwen3_tools",)
RECIPE_FILE = "recipe.json"


def recipe_digest(name: str) -> str:
    """A digest of everything that decides the build of built-in model `name` (its cache key)."""
    key = json.dumps([BUILD_VERSION, BUILTINS[name], CHARACTERS, WARMUP_STEPS], sort_keys=True)
    if name == "tiny_qwen3_tools":
        parts = [TOOLS_BUILD_VERSION, BUILTINS[name], TOOL_CHARACTERS, TOOL_TOKENS]
        key = json.dumps([*parts, TOOLS_CHAT_TEMPLATE, TOOLS_WARMUP], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def shipped_digest(name: str) -> str | None:
    """The recipe digest of the shipped build of `name`; None if none ships."""
    recipe = SHIPPED / name / RECIPE_FILE
    return json.loads(recipe.read_text())["digest"] if recipe.is_file() else None


def builtin_path(name: str) -> Path:
    """The cached build of built-in model `name`: on first use copied from the shipped build
    when one ships for this recipe, else built (a few seconds; the tools model about 2 minutes)."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    digest = recipe_digest(name)
    target = cache_root() / f"{name}-{digest}"
    if (target / "config.json").exists():
        return target
    # Made beside the target and renamed, so a crash never leaves a half-built model behind.
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if shipped_digest(name) == digest:
        shutil.copytree(SHIPPED / name, staging, ignore=shutil.ignore_patterns(RECIPE_FILE))
    else:
        build(staging, name)
    try:
        staging.rename(target)
    except OSError:  # another process finished first; use its build
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ship(name: str) -> Path:
    """Build `name` into this package's shipped folder, with its recipe digest (run after
    changing a shipped built-in's recipe; tests/test_load_weights.py fails until then)."""
    if name not in SHIPPED_NAMES:
        raise ValueError(f"{name!r} does not ship built; shipped: {', '.join(SHIPPED_NAMES)}")
    target = SHIPPED / name
    staging = target.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    build(staging, name)
    recipe = {"name": name, "digest": recipe_digest(name)}
    (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m stages.tiny_model",
        description="Build a shipped built-in model into the package (after its recipe changed).",
    )
    parser.add_argument("command", choices=["ship"])
    parser.add_argument("name", choices=SHIPPED_NAMES)
    args = parser.parse_args(argv)
    print(ship(args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
