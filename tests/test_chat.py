"""Chat-template prompts (system prompt, Qwen3's enable_thinking) and thinking-mode parsing."""

import shutil
from pathlib import Path
from types import SimpleNamespace

from stages import rewards
from stages.chat import completion_parts, split_thinking
from stages.data import encode_prompt
from stages.load_weights import load

import mlx.core as mx
import numpy as np
import pytest

from pipelines.config import ConfigError, compose

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The part of Qwen3's template that matters here: system turn, user turn, generation prompt,
# and an empty thinking block when enable_thinking is false (spelled "(think)" because the
# fixture's character tokenizer has no "<").
QWEN3_LIKE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "(think)\n\n(/think)\n\n{% endif %}{% endif %}"
)


@pytest.mark.parametrize(
    "text, thinking, answer",
    [
        ("<think>\nadd 2 and 3\n</think>\n\n5", "add 2 and 3", "5"),
        ("add them</think> 5 ", "add them", "5"),  # template opened the block in the prompt
        ("<think>\n\n</think>\n\n5", "", "5"),  # non-thinking mode's empty block
        ("<think>still going", "still going", ""),  # cut off by max_new_tokens
        (" 5\n", None, "5"),  # no thinking at all
    ],
)
def test_split_thinking(text, thinking, answer):
    assert split_thinking(text) == (thinking, answer)


def test_enable_thinking_and_system_prompt_reach_the_template(tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(FIXTURES / "qwen3_tiny", directory)
    (directory / "chat_template.jinja").write_text(QWEN3_LIKE_TEMPLATE)
    _, tokenizer = load(directory)
    thinking = tokenizer.decode(
        encode_prompt(
            tokenizer,
            "2+3=",
            use_chat_template=True,
            system_prompt="be brief",
            template_kwargs={"enable_thinking": True},
        )
    )
    assert thinking == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n2+3=<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = encode_prompt(
        tokenizer, "2+3=", use_chat_template=True, template_kwargs={"enable_thinking": False}
    )
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n(think)\n\n(/think)\n\n")


def test_rewards_receive_thinking_and_answer():
    seen = {}

    def answer_only(prompts, completions, completion_thinking, completion_answer, answer, **_):
        seen.update(thinking=completion_thinking, answers=completion_answer)
        return [float(a == b) for a, b in zip(completion_answer, answer)]

    batch = SimpleNamespace(
        prompt_texts=["1+4=", "1+4="],
        texts=["<think>one plus four</think>\n5", "4"],
        columns={"answer": ["5", "5"]},
    )
    scores = rewards.score(batch, [answer_only], [1.0])
    np.testing.assert_array_equal(np.array(scores), [[1.0], [0.0]])
    assert seen == {"thinking": ["one plus four", None], "answers": ["5", "4"]}
    assert completion_parts(["x"]) == {"completion_thinking": [None], "completion_answer": ["x"]}


def test_model_and_chat_config_validation():
    cfg = compose(
        [
            "model.lora.enabled=true",
            "model.lora.target_modules=[q_proj,v_proj]",
            "model.fuse_lora_at_end=true",
            "train.gradient_checkpointing=true",
            "data.use_chat_template=true",
            "+data.chat_template_kwargs.enable_thinking=false",
            "model.dtype=checkpoint",
        ]
    )
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    for overrides, key in [
        (["model.lora.rank=0"], "model.lora.rank"),
        (["model.lora.dropout=1.5"], "model.lora.dropout"),
        (["model.lora.num_layers=0"], "model.lora.num_layers"),
        (["model.fuse_lora_at_end=true"], "model.fuse_lora_at_end"),
        (["+data.chat_template_kwargs.enable_thinking=false"], "data.chat_template_kwargs"),
        (["model.dtype=fp8"], "model.dtype"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
            compose(overrides)
        assert "\n" not in str(error.value)


def test_tokens_unchanged_by_default_encoding():
    _, tokenizer = load(FIXTURES / "qwen3_tiny")
    ids = encode_prompt(tokenizer, "hi", use_chat_template=True)
    assert isinstance(ids, list) and mx.array(ids).dtype == mx.int32
