"""Every shipped config composes and validates; bad values are one-line errors naming the key."""

import pytest

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
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as error:
        compose(overrides)
    message = str(error.value)
    assert fragment in message
    assert "\n" not in message


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
