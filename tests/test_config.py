"""Every shipped config composes and validates; bad values are one-line errors naming the key."""

import dataclasses
import re

import pytest
from omegaconf import OmegaConf

from pipelines.config import CONF_DIR, ConfigError, compose, flatten

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
GROUP_OPTIONS = [
    (group, p.stem)
    for group in ("model", "data", "reward")
    for p in sorted((CONF_DIR / group).glob("*.yaml"))
]


def test_there_is_something_to_check():
    assert "quickstart" in EXPERIMENTS and len(GROUP_OPTIONS) >= 6


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose([f"+experiment={experiment}"])
    assert cfg.model.path and cfg.data.source and cfg.reward.funcs


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    compose([f"{group}={option}"])


def test_no_experiment_is_the_quickstart():
    assert compose([]) == compose(["+experiment=quickstart"])


def test_overrides_apply_and_flatten():
    cfg = compose(["train.steps=7", "rollout.temperature=0.5", "+experiment=quickstart"])
    flat = flatten(cfg)
    assert cfg.train.steps == 7 and flat["train.steps"] == "7"
    assert flat["rollout.temperature"] == "0.5" and flat["model.path"] == "builtin:tiny_qwen3"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.lerning_rate=1"], "unknown key train.lerning_rate"),
        (["+train.lerning_rate=1"], "Key 'lerning_rate' not in 'TrainConfig'"),
        (["train.learning_rate=fast"], "full_key: train.learning_rate"),
        (["train.loss_type=ppo"], "train.loss_type='ppo' is invalid"),
        (["rollout.group_size=1"], "rollout.group_size=1 is invalid"),
        (["rollout.top_p=0"], "rollout.top_p=0.0 is invalid"),
        (["rollout.temperature=-1"], "rollout.temperature=-1.0 is invalid"),
        (["+experiment=nope"], "Could not find 'experiment/nope'"),
        (["+reward.funcs.made_up.weight=1"], "reward.funcs.made_up"),
        (
            ["train.multi_objective_aggregation=mean"],
            "train.multi_objective_aggregation='mean' is invalid",
        ),
        (["train.importance_sampling_level=word"], "train.importance_sampling_level='word'"),
        (["train.delta=0.5"], "train.delta=0.5 is invalid: expected null or > 1"),
        (["train.steps_per_generation=5"], "a divisor of the 64 rows of a generation batch"),
        (["reward.weights=[1.0,2.0]"], "reward.weights has 2 values for 1 reward functions"),
        (["reward.on_error=ignore"], "reward.on_error='ignore' is invalid"),
        (["reward.timeout=0"], "reward.timeout=0.0 is invalid"),
        (["+reward.funcs.length.kwargs.tagret=3"], "reward.funcs.length.kwargs is invalid"),
        (["+reward.funcs.length.weight=1"], "length needs exactly one of target or max_length"),
        (["data.eval_size=-1"], "data.eval_size=-1 is invalid"),
        (["eval.accuracy_reward=nope"], "eval.accuracy_reward='nope' is invalid"),
        (["eval.num_samples=0"], "eval.num_samples=0 is invalid"),
        (["distributed.backend=tcp"], "distributed.backend='tcp' is invalid"),
        (["distributed.stop_grace_seconds=0"], "distributed.stop_grace_seconds=0.0 is invalid"),
        (
            ["train.loss_type=ppo"],
            "expected grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo",
        ),
        (["train.epsilon_high=-1"], "train.epsilon_high=-1.0 is invalid: expected null or >= 0"),
        (["train.sapo_temperature_neg=0"], "train.sapo_temperature_neg=0.0 is invalid"),
        (["train.max_resample_rounds=-1"], "train.max_resample_rounds=-1 is invalid"),
        (["train.vllm_importance_sampling_mode=token"], "train.vllm_importance_sampling_mode"),
        (
            ["train.vllm_importance_sampling_clip_min=3.0"],
            "train.vllm_importance_sampling_clip_min=3.0 is invalid: expected less than",
        ),
        (
            [
                "train.vllm_importance_sampling_mode=token_truncate",
                "train.vllm_importance_sampling_clip_max=null",
            ],
            "train.vllm_importance_sampling_clip_max=None is invalid",
        ),
        (
            ["train.vllm_importance_sampling_correction=true", "rollout.logprobs_source=policy"],
            "train.vllm_importance_sampling_correction=True is invalid",
        ),
        (
            [
                "train.vllm_importance_sampling_correction=true",
                "train.loss_type=vespo",
            ],
            "train.vllm_importance_sampling_mode='sequence_mask' is invalid: expected "
            "token_truncate | token_mask with loss_type=vespo",
        ),
        (
            ["rollout.fast_kernels=true", "rollout.engine=mlx_lm"],
            "rollout.fast_kernels=True is invalid: expected false with engine=mlx_lm",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as error:
        compose(overrides)
    message = str(error.value)
    assert fragment in message
    assert "\n" not in message


def test_trl_defaults_and_the_deprecated_cap():
    train = compose([]).train
    assert train.epsilon_high is None and train.use_bias_correction_kl
    assert train.vllm_importance_sampling_mode == "sequence_mask"
    assert train.sampler_clip_max == 3.0 and train.vllm_importance_sampling_clip_min is None
    capped = compose(["train.vllm_importance_sampling_cap=2.0"]).train
    assert capped.sampler_clip_max == 2.0  # TRL copies the deprecated cap into clip_max
    # null: on exactly when the rollout runs on the fast kernels (TRL: only for vLLM rollouts)
    assert train.with_sampler_correction(True).vllm_importance_sampling_correction is True
    assert train.with_sampler_correction(False).vllm_importance_sampling_correction is False
    forced = compose(["train.vllm_importance_sampling_correction=true"]).train
    assert forced.with_sampler_correction(False).vllm_importance_sampling_correction is True


def test_new_objective_keys_compose():
    cfg = compose(
        [
            "train.steps_per_generation=2",
            "train.multi_objective_aggregation=normalize_then_sum",
            "train.mask_truncated_completions=true",
            "+reward.funcs.length.kwargs.target=3",
            "+reward.funcs.format_soft.weight=0.5",
            "reward.on_error=none",
            "reward.timeout=5",
            "data.eval_size=32",
            "eval.every=50",
        ]
    )
    assert list(cfg.reward.funcs) == ["exact_answer", "length", "format_soft"]
    assert cfg.reward.funcs["length"].kwargs == {"target": 3}
    assert cfg.train.steps_per_generation == 2 and cfg.data.eval_size == 32


# -- conf/grpo.yaml mirrors the schema ---------------------------------------------------------

_KEY_LINE = re.compile(
    r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*)(?:#\s?(?P<note>.*))?$"
)


def _schema_leaves(cls, prefix=""):
    """Dotted key -> (default, help) for every leaf field of the config dataclasses."""
    leaves = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            leaves.update(_schema_leaves(type(default), f"{prefix}{f.name}."))
        else:
            leaves[prefix + f.name] = (default, f.metadata.get("help", ""))
    return leaves


def _yaml_leaves(path):
    """Dotted key -> (default, comment) of conf/grpo.yaml: a key's comment continues on the
    following comment-only lines whose `#` is in the same column."""
    values = OmegaConf.to_container(OmegaConf.load(path))
    values.pop("defaults")
    leaves, stack, last = {}, [], None
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and last is not None and line.index("#") == last[1]:
            leaves[last[0]][1].append(line.split("#", 1)[1].strip())
            continue
        last = None
        match = _KEY_LINE.match(line)
        if not match or line.startswith("defaults") or line.startswith(" " * 2 + "-"):
            continue
        depth = len(match["indent"]) // 2
        stack[depth:] = [match["key"]]
        if not match["value"].strip():  # a section header
            continue
        key = ".".join(stack)
        node = values
        for part in stack:
            node = node[part]
        leaves[key] = (node, [match["note"].strip()] if match["note"] else [])
        if match["note"]:
            last = (key, line.index("#"))
    return {k: (v, " ".join(note)) for k, (v, note) in leaves.items() if not k.startswith("-")}


def test_grpo_yaml_lists_every_schema_key_with_its_default_and_help():
    from pipelines.config import GRPOConfig

    schema = _schema_leaves(GRPOConfig)
    yaml = _yaml_leaves(CONF_DIR / "grpo.yaml")
    assert sorted(yaml) == sorted(schema), "conf/grpo.yaml and the schema list different keys"
    for key, (default, help_text) in schema.items():
        value, comment = yaml[key]
        assert help_text, f"{key} has no help text in its dataclass field"
        assert value == default, f"conf/grpo.yaml {key}: {value!r}, the schema says {default!r}"
        assert " ".join(comment.split()) == " ".join(help_text.split()), (
            f"conf/grpo.yaml {key}: the comment is not the field's help text"
        )


def test_presets_hold_only_what_differs_from_the_defaults():
    defaults = OmegaConf.load(CONF_DIR / "grpo.yaml")
    for group in ("model", "data", "reward"):
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            preset = OmegaConf.to_container(OmegaConf.load(path))
            flat = _flat(preset)
            same = [
                key
                for key, value in flat.items()
                if OmegaConf.select(defaults, f"{group}.{key}", default=object()) == value
            ]
            assert not same, f"{path.name} repeats defaults: {same}"


def _flat(node, prefix=""):
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def test_the_calculator_experiment_sets_up_on_qwen3s_own_template():
    """gsm8k_calculator_qwen3_0_6b against Qwen3-0.6B's chat template (tests/fixtures; the
    weights are not needed): the calculator's schema and the system prompt are rendered, the
    parser is Qwen3's, the non-thinking generation prompt ends the prompt, and a calculator
    call's result is appended as Qwen3's <tool_response> turn."""
    from stages import multiturn, tools
    from stages.data import encode_prompt, prompt_messages
    from stages.tiny_model import build_tokenizer

    from pipelines.config import to_schema

    cfg = to_schema(compose(["+experiment=gsm8k_calculator_qwen3_0_6b"]))
    tokenizer = build_tokenizer(tools=True)
    template = CONF_DIR.parent / "tests" / "fixtures" / "qwen3_chat_template.jinja"
    tokenizer.chat_template = template.read_text()
    kwargs = dict(cfg.data.chat_template_kwargs)
    turns = multiturn.setup(
        cfg.rollout, tokenizer, system_prompt=cfg.data.system_prompt, template_kwargs=kwargs
    )
    assert turns.toolbox.parser.family == "qwen3" and turns.toolbox.max_iterations == 4
    messages = prompt_messages("What is 12*7?", cfg.data.system_prompt)
    schemas = turns.toolbox.schemas()
    text = tokenizer.apply_chat_template(
        messages, tools=schemas, add_generation_prompt=True, tokenize=False, **kwargs
    )
    assert '"name": "calculator"' in text and cfg.data.system_prompt in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = encode_prompt(tokenizer, messages, template_kwargs=kwargs, tools=schemas)
    assert ids == list(tokenizer.encode(text, add_special_tokens=False))
    text = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>'
    _, (call,) = turns.toolbox.parser.parse(text)
    result = tools.run_call(call, turns.toolbox.functions(), 10.0, 2000)
    suffix = tools.tool_suffix_ids(tokenizer, [result.message()], kwargs)
    assert tokenizer.decode(suffix).startswith("\n<|im_start|>user\n<tool_response>\n84\n")
