"""Config fields with their help text, and the checks each config dataclass runs on its values.

Every config section is a dataclass that lives beside the code that uses it (RolloutConfig in
stages/rollout.py, TrainConfig in stages/grpo_update.py, ...) and is also the Hydra schema node
for that section (pipelines/config.py). A field is declared once, with its help text next to it,
as mlx-lm's `TrainingArgs` does:

    temperature: float = setting(1.0, "0 = greedy")

conf/grpo.yaml lists every key with the same default and the help text as its comment
(tests/test_config.py keeps them equal). A section's `validate()` checks its own values with
`check`, which raises `FieldError` naming the field; pipelines/config.py adds the section's name,
so a user sees `config rollout.top_p=0.0 is invalid: expected in (0, 1]`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import field
from typing import Any

MISSING = "???"  # OmegaConf's marker for a value that must be given (e.g. model.path)


def setting(default: Any = None, help: str = "", *, factory=None):  # noqa: A002
    """A dataclass field with `help` in its metadata; `factory` for list/dict defaults."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def help_text(cls, name: str) -> str:
    """The help text of field `name` of config dataclass `cls`."""
    return cls.__dataclass_fields__[name].metadata.get("help", "")


class FieldError(ValueError):
    """A config value that is wrong. `key` is the field's dotted path within the section that
    raised it; `within(section)` prefixes the enclosing section. The message is the key followed
    by `rest` (default: "=<value> is invalid: expected <expected>")."""

    def __init__(self, key: str, value: Any = None, expected: str = "", *, rest: str | None = None):
        self.key, self.value, self.expected = key, value, expected
        self.rest = rest if rest is not None else f"={value!r} is invalid: expected {expected}"
        super().__init__(key + self.rest)

    def within(self, section: str) -> FieldError:
        return FieldError(f"{section}.{self.key}", self.value, self.expected, rest=self.rest)


def check(condition: bool, key: str, value: Any, expected: str) -> None:
    """Raise FieldError(key, value, expected) unless `condition`."""
    if not condition:
        raise FieldError(key, value, expected)


def one_of(key: str, value: Any, choices) -> None:
    """`value` must be one of `choices` (the allowed-value list of the module that uses it)."""
    check(value in choices, key, value, " | ".join(map(str, choices)))


def import_callable(spec: str, what: str, builtins: dict, example: str) -> Callable:
    """The built-in `spec` names, or the callable at the import path `spec` (pkg.module.fn).
    ValueError (one line, naming `what`: "tool", "reward") when it is neither, cannot be
    imported, or is not callable."""
    if spec in builtins:
        return builtins[spec]
    module_name, _, attribute = spec.rpartition(".")
    if not module_name:
        raise ValueError(
            f"{what} {spec!r} is not a built-in ({', '.join(sorted(builtins))}) "
            f"nor an import path like {example}"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{what} {spec!r} cannot be imported: {error}") from None
    if not callable(fn):
        raise ValueError(f"{what} {spec!r} is not callable")
    return fn
