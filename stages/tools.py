"""Tools and environments for multi-turn rollouts (TRL 1.16's `tools` and `environment_factory`).

A tool is a Python function with type hints and a Google-style docstring (`Args:` describing
each argument). Its JSON schema is transformers' `get_json_schema`, and the schemas go to the
tokenizer's chat template as `apply_chat_template(..., tools=schemas)`, as TRL passes them.

The model's tool calls are read by the parser of its chat-template family, chosen from the
template's text (`tool_call_parser`), never fixed to one model:

- `qwen3` (Qwen2.5, Qwen3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- `qwen3_5` (Qwen3.5+): `<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function>`;
- `llama3` (Llama 3.1/3.2): a bare `{"name": ..., "parameters": {...}}`.

A call runs on its own thread with a time limit (`run_call`); what it prints goes nowhere (a
capped buffer per call), its result is cut to a number of characters, and every failure becomes
the tool message's text, TRL's `str({"error": ...})`, counted by kind (`FAILURES`): a call whose
JSON does not parse, a call of the wrong shape or with arguments the function does not take, an
unknown tool, an exception, a timeout. A call that overruns has an exception raised inside its
thread, so a busy loop stops; a call blocked in C (a socket, `time.sleep`) is left behind idle.

The tool message goes into the conversation through the chat template: `tool_suffix_ids` are
the tokens the template puts between the end of the assistant's turn (its EOS) and the next
assistant turn, rendered from a dummy conversation as TRL's `_get_tool_suffix_ids` does.

Environments (TRL's `environment_factory`): a factory (a class) makes one object per rollout row;
`reset(**row)` returns the opening observation (appended to the prompt's last message) or None;
every public method but `reset` and `get_reward` is a tool bound to that row's object, and
`get_reward()` (optional) scores the final state. Objects are pooled and reused across steps.

Built-in tools (`TOOLS`): `calculator` (arithmetic), `python_eval` (a limited Python expression:
literals, arithmetic, comparisons, comprehensions and a few pure built-ins, evaluated on the
parsed syntax tree; no names, attributes or calls outside that list, sizes and time bounded) and
`add` (two integers; the tools quickstart's).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import ctypes
import importlib
import inspect
import json
import math
import operator
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stages.settings import import_callable

# Failure kinds, in the order the metrics list them (tools/failures/<kind>).
FAILURES = ("invalid_json", "bad_call", "unknown_tool", "exception", "timeout")
PRINT_CAP = 4096  # characters a call may print before the rest is dropped

# -- built-in tools -----------------------------------------------------------------------------

TOOLS: dict[str, Callable] = {}


def register(fn: Callable) -> Callable:
    """Decorator: make a tool available by its function name in `rollout.tools`."""
    TOOLS[fn.__name__] = fn
    return fn


class _Limits:
    """Bounds of the expression evaluators: the source, integers, sequences and work done."""

    chars = 2000  # expression length
    int_bits = 4096  # about 1,233 decimal digits
    items = 10_000  # elements of a sequence or string built
    steps = 100_000  # syntax-tree nodes evaluated (comprehensions count each iteration)


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_MATH = {
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def _range(*args: int) -> range:
    values = range(*args)
    if len(values) > _Limits.items:
        raise ValueError(f"range of {len(values)} numbers is over the limit of {_Limits.items}")
    return values


_PYTHON = _MATH | {
    "len": len,
    "sum": sum,
    "sorted": sorted,
    "reversed": lambda x: list(reversed(x)),
    "range": _range,
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "list": list,
    "tuple": tuple,
    "set": set,
    "any": any,
    "all": all,
    "enumerate": lambda x: list(enumerate(x)),
    "zip": lambda *x: list(zip(*x)),
}


class _Evaluator:
    """Evaluates an expression's syntax tree node by node: only the node types and functions
    listed here, within `_Limits`. `python`: the python_eval language; else the calculator's
    (numbers, + - * / // % **, parentheses, math functions, pi and e)."""

    def __init__(self, python: bool):
        self.python = python
        self.functions = _PYTHON if python else _MATH
        self.steps = 0

    def run(self, source: str) -> Any:
        if len(source) > _Limits.chars:
            raise ValueError(f"expression of {len(source)} characters is over {_Limits.chars}")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as error:
            raise ValueError(f"invalid syntax: {error.msg}") from None
        return self.visit(tree.body, {})

    def visit(self, node: ast.AST, scope: dict) -> Any:
        self.steps += 1
        if self.steps > _Limits.steps:
            raise ValueError(f"expression takes more than {_Limits.steps} steps")
        method = getattr(self, f"visit_{type(node).__name__}", None)
        if method is None or (not self.python and type(node).__name__ in _PYTHON_ONLY):
            raise ValueError(f"{type(node).__name__} is not allowed here")
        return method(node, scope)

    def visit_Constant(self, node, scope):
        value = node.value
        allowed = (int, float, str, bool, type(None)) if self.python else (int, float)
        if not isinstance(value, allowed) or (isinstance(value, bool) and not self.python):
            raise ValueError(f"constant {value!r} is not allowed")
        return _checked(value)

    def visit_Name(self, node, scope):
        if node.id in scope:
            return scope[node.id]
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if self.python and node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        raise ValueError(f"name {node.id!r} is not defined")

    def visit_BinOp(self, node, scope):
        op = _BINARY.get(type(node.op))
        if op is None:
            raise ValueError(f"operator {type(node.op).__name__} is not allowed")
        left, right = self.visit(node.left, scope), self.visit(node.right, scope)
        if op is operator.pow and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(left.bit_length(), 1) * right > _Limits.int_bits:
                raise ValueError(f"{left} ** {right} is over {_Limits.int_bits} bits")
        if op is operator.mul and isinstance(right, int) and isinstance(left, str | list | tuple):
            left, right = right, left
        if op is operator.mul and isinstance(left, int) and isinstance(right, str | list | tuple):
            if left * len(right) > _Limits.items:
                raise ValueError(f"a sequence of {left * len(right)} items is over the limit")
        return _checked(op(left, right))

    def visit_UnaryOp(self, node, scope):
        op = _UNARY.get(type(node.op))
        if op is None or (op is operator.not_ and not self.python):
            raise ValueError(f"operator {type(node.op).__name__} is not allowed")
        return op(self.visit(node.operand, scope))

    def visit_Call(self, node, scope):
        if not isinstance(node.func, ast.Name) or node.func.id not in self.functions:
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise ValueError(f"function {name!r} is not allowed")
        if node.keywords:
            raise ValueError("keyword arguments are not allowed")
        args = [self.visit(arg, scope) for arg in node.args]
        return _checked(self.functions[node.func.id](*args))

    # -- python_eval only --

    def visit_BoolOp(self, node, scope):
        value = None
        for operand in node.values:
            value = self.visit(operand, scope)
            if isinstance(node.op, ast.And) != bool(value):
                return value
        return value

    def visit_Compare(self, node, scope):
        left = self.visit(node.left, scope)
        for op, right_node in zip(node.ops, node.comparators):
            compare = _COMPARE.get(type(op))
            if compare is None:
                raise ValueError(f"comparison {type(op).__name__} is not allowed")
            right = self.visit(right_node, scope)
            if not compare(left, right):
                return False
            left = right
        return True

    def visit_IfExp(self, node, scope):
        branch = node.body if self.visit(node.test, scope) else node.orelse
        return self.visit(branch, scope)

    def visit_List(self, node, scope):
        return _checked([self.visit(e, scope) for e in node.elts])

    def visit_Tuple(self, node, scope):
        return _checked(tuple(self.visit(e, scope) for e in node.elts))

    def visit_Set(self, node, scope):
        return _checked({self.visit(e, scope) for e in node.elts})

    def visit_Dict(self, node, scope):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict display is not allowed")
        pairs = [
            (self.visit(k, scope), self.visit(v, scope)) for k, v in zip(node.keys, node.values)
        ]
        return _checked(dict(pairs))

    def visit_Subscript(self, node, scope):
        return self.visit(node.value, scope)[self.visit(node.slice, scope)]

    def visit_Slice(self, node, scope):
        parts = (node.lower, node.upper, node.step)
        return slice(*(None if p is None else self.visit(p, scope) for p in parts))

    def _comprehension(self, node, scope, make):
        results = []

        def loop(generators, scope):
            if not generators:
                results.append(make(scope))
                if len(results) > _Limits.items:
                    raise ValueError(f"a comprehension of over {_Limits.items} items")
                return
            first, rest = generators[0], generators[1:]
            if first.is_async:
                raise ValueError("async comprehensions are not allowed")
            for item in self.visit(first.iter, scope):
                inner = dict(scope)
                self._bind(first.target, item, inner)
                if all(self.visit(test, inner) for test in first.ifs):
                    loop(rest, inner)

        loop(node.generators, scope)
        return results

    def _bind(self, target, value, scope):
        if isinstance(target, ast.Name):
            scope[target.id] = value
        elif isinstance(target, ast.Tuple):
            values = list(value)
            if len(values) != len(target.elts):
                raise ValueError("cannot unpack: wrong number of values")
            for element, item in zip(target.elts, values):
                self._bind(element, item, scope)
        else:
            raise ValueError(f"cannot assign to {type(target).__name__}")

    def visit_ListComp(self, node, scope):
        return self._comprehension(node, scope, lambda s: self.visit(node.elt, s))

    def visit_GeneratorExp(self, node, scope):
        return self.visit_ListComp(node, scope)

    def visit_SetComp(self, node, scope):
        return set(self.visit_ListComp(node, scope))

    def visit_DictComp(self, node, scope):
        pairs = self._comprehension(
            node, scope, lambda s: (self.visit(node.key, s), self.visit(node.value, s))
        )
        return dict(pairs)


_PYTHON_ONLY = {
    "BoolOp",
    "Compare",
    "IfExp",
    "List",
    "Tuple",
    "Set",
    "Dict",
    "Subscript",
    "Slice",
    "ListComp",
    "GeneratorExp",
    "SetComp",
    "DictComp",
}


def _checked(value: Any) -> Any:
    """`value`, unless it is over the size limits or a non-finite float."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value.bit_length() > _Limits.int_bits:
        raise ValueError(f"integer of {value.bit_length()} bits is over {_Limits.int_bits}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is not a finite number")
    if isinstance(value, str | list | tuple | set | dict) and len(value) > _Limits.items:
        raise ValueError(f"a value of {len(value)} items is over the limit of {_Limits.items}")
    return value


@register
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, and the functions sqrt, log,
            exp, sin, cos, tan, floor, ceil, abs, round, min, max and the constants pi and e,
            e.g. "(3 + 4) * 2".
    """
    return str(_Evaluator(python=False).run(expression))


@register
def python_eval(expression: str) -> str:
    """Evaluate one Python expression (no statements, imports, attributes or names other than
    a few pure built-ins) and return the repr of its value.

    Args:
        expression: A Python expression of literals, arithmetic, comparisons, conditional
            expressions, comprehensions and the built-ins len, sum, sorted, reversed, range,
            min, max, abs, round, int, float, str, bool, list, tuple, set, any, all, enumerate,
            zip and the math functions sqrt, log, exp, sin, cos, tan, floor, ceil, e.g.
            "sum(x * x for x in range(10))".
    """
    return repr(_Evaluator(python=True).run(expression))


@register
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


# -- resolving tools and schemas ----------------------------------------------------------------


def resolve_tool(spec: str) -> Callable:
    """The function a `rollout.tools` entry names: a built-in (TOOLS) or an import path
    `pkg.module.fn`. Raises ValueError (one line) when it cannot be imported or called."""
    return import_callable(spec, "tool", TOOLS, "my_package.tools.my_tool")


def tool_schema(fn: Callable) -> dict:
    """The tool's JSON schema, by transformers' `get_json_schema` (type hints and the
    docstring's Args). Raises ValueError (one line) saying what is missing."""
    from transformers.utils import get_json_schema

    name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    try:
        return get_json_schema(fn)
    except Exception as error:  # TypeHintParsingException, DocstringParsingException
        text = " ".join(str(error).split())
        raise ValueError(
            f"tool {name} has no usable JSON schema: {text}; give every argument a type hint "
            "and describe it under Args: in the docstring"
        ) from None


# -- environments -------------------------------------------------------------------------------


def environment_tool_names(environment_class: type) -> list[str]:
    """The public methods of an environment class that are tools (TRL: functions defined on the
    class, not reset or get_reward, not starting with _), in `inspect.getmembers` order."""
    return [
        name
        for name, _ in inspect.getmembers(environment_class, predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]


def resolve_environment_factory(spec: str) -> Callable:
    """The factory a `rollout.environment_factory` import path names, probed once: it makes an
    object with a callable `reset`, and each of its tool methods has a JSON schema. Raises
    ValueError (one line) otherwise."""
    module_name, _, attribute = spec.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"environment_factory {spec!r} cannot be imported: {error}") from None
    if not callable(factory):
        raise ValueError(f"environment_factory {spec!r} is not callable")
    try:
        probe = factory()
    except Exception as error:
        raise ValueError(
            f"environment_factory {spec!r} raised {type(error).__name__}: {error} when called "
            "with no arguments"
        ) from None
    if not callable(getattr(probe, "reset", None)):
        raise ValueError(
            f"environment_factory {spec!r} makes {type(probe).__name__} objects with no callable "
            "reset(**row); define reset to start an episode from a dataset row"
        )
    for name in environment_tool_names(type(probe)):
        tool_schema(getattr(probe, name))
    return factory


def environment_reward(factory: Callable) -> Callable | None:
    """A TRL-signature reward function calling each row's environment's `get_reward()` (TRL
    adds one, named after the environment class, weight 1), or None without get_reward."""
    probe_class = factory if inspect.isclass(factory) else type(factory())
    if not callable(getattr(probe_class, "get_reward", None)):
        return None

    def get_reward(prompts, completions, environments=None, **_):
        if environments is None:
            raise ValueError("get_reward needs the environments of the rollout")
        return [environment.get_reward() for environment in environments]

    get_reward.__name__ = probe_class.__name__
    return get_reward


# -- parsing tool calls -------------------------------------------------------------------------


@dataclass
class ToolCall:
    """One call the model wrote. `failure` ("invalid_json" | "bad_call") and `error` when it
    could not be read; then `name` is what could be read of it ("" if nothing)."""

    name: str
    arguments: dict = field(default_factory=dict)
    failure: str | None = None
    error: str = ""

    def message(self) -> dict:
        """The assistant message's entry for this call (TRL's tool_calls item)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call_from_json(text: str, arguments_key: str = "arguments") -> ToolCall:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        return ToolCall("", failure="invalid_json", error=f"invalid JSON in tool call: {error}")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall(
            "", failure="bad_call", error='a tool call is {"name": ..., "arguments": {...}}'
        )
    arguments = value.get(arguments_key, {})  # TRL fills missing arguments with {}
    if isinstance(arguments, str):  # OpenAI style: arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            return ToolCall(value["name"], failure="invalid_json", error=f"invalid JSON: {error}")
    if not isinstance(arguments, dict):
        return ToolCall(value["name"], failure="bad_call", error="arguments must be an object")
    return ToolCall(value["name"], arguments)


class Qwen3Parser:
    """Qwen2.5 / Qwen3 / Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
    any number of them after the turn's text (transformers' qwen3 response schema)."""

    family = "qwen3"
    _BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of one assistant turn's text."""
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for match in self._BLOCK.finditer(text, start):
            if not match.group(2):
                calls.append(
                    ToolCall("", failure="invalid_json", error="<tool_call> is not closed")
                )
                continue
            calls.append(self._read(match.group(1).strip()))
        return text[:start].rstrip("\n"), calls

    def _read(self, body: str) -> ToolCall:
        return _call_from_json(body)


class Qwen35Parser(Qwen3Parser):
    """Qwen3.5+: `<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function>
    </tool_call>`; a value is read as JSON where it parses, else as text."""

    family = "qwen3_5"
    _FUNCTION = re.compile(r"<function=([^\n>]+)>(.*?)</function>", re.DOTALL)
    _PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)

    def _read(self, body: str) -> ToolCall:
        function = self._FUNCTION.search(body)
        if function is None:
            return ToolCall("", failure="bad_call", error="no <function=NAME>...</function>")
        arguments = {}
        for key, value in self._PARAMETER.findall(function.group(2)):
            try:
                arguments[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                arguments[key.strip()] = value
        return ToolCall(function.group(1).strip(), arguments)


class Llama3Parser:
    """Llama 3.1 / 3.2: the whole turn is one `{"name": ..., "parameters": {...}}` (optionally
    after <|python_tag|>); anything else is plain content."""

    family = "llama3"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not re.match(r'\{\s*"name"\s*:', body):
            return text, []
        return "", [_call_from_json(body, arguments_key="parameters")]


PARSERS = (Qwen35Parser, Qwen3Parser, Llama3Parser)


def _template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or ""


def tool_call_parser(tokenizer):
    """The parser of the tokenizer's chat-template family, read from the template's text.
    Raises ValueError (one line) when the template has no tool-call format we parse."""
    template = _template_text(tokenizer)
    if "<tool_call>" in template and "<function=" in template:
        return Qwen35Parser()
    if "<tool_call>" in template:
        return Qwen3Parser()
    if '"parameters": ' in template:
        return Llama3Parser()
    raise ValueError(
        "the tokenizer's chat template writes tool calls in a format this pipeline does not "
        "parse (it reads Qwen3's <tool_call> JSON, Qwen3.5's <function=...> and Llama 3.1's "
        '{"name", "parameters"}); use a model of one of those families'
    )


def check_tool_template(tokenizer, template_kwargs: dict | None = None) -> None:
    """The chat template renders a tool call (name and arguments) and a tool result (TRL's
    supports_tool_calling). Raises ValueError (one line) when it does not."""
    if not _template_text(tokenizer):
        raise ValueError(
            "tools need a chat template that renders tool calls, but the tokenizer has none; "
            "use a model with a tool-calling chat template (e.g. Qwen3)"
        )
    sentinels = ("tool_name_a8f3e2b1", "tool_arg_key_b9d4f5c2", "tool_arg_val_d6e7a9f3")
    content = "tool_content_c4f9a8e2"
    call = {"type": "function", "function": {"name": sentinels[0], "arguments": {}}}
    call["function"]["arguments"] = {sentinels[1]: sentinels[2]}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": sentinels[0], "content": content},
    ]
    try:
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, **dict(template_kwargs or {})
        )
    except Exception as error:
        raise ValueError(
            f"the tokenizer's chat template cannot render a tool-calling conversation "
            f"({type(error).__name__}: {error}); use a model whose template supports tools"
        ) from None
    missing = [s for s in (*sentinels, content) if s not in rendered]
    if missing:
        raise ValueError(
            "the tokenizer's chat template has no tool support (it drops the tool call or the "
            "tool result); use a model whose template renders tools, e.g. Qwen3"
        )


def tool_suffix_ids(tokenizer, tool_messages: list[dict], template_kwargs: dict | None = None):
    """Token ids the chat template puts after an assistant turn's end (its EOS) for these tool
    messages, up to and including the next assistant turn's generation prompt.

    As TRL's _get_tool_suffix_ids, from a dummy conversation (a user message, an assistant
    message calling the first tool) rendered with the tool messages and the generation prompt;
    the suffix is what follows the assistant message's EOS. Unlike TRL, the assistant message
    itself may render differently once tool messages follow it (Qwen3's template drops an
    empty `<think>` block from earlier turns): only the user message must render the same
    alone, which every template we know does."""
    kwargs = dict(template_kwargs or {})
    call = {"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}
    user = [{"role": "user", "content": "dummy"}]
    dummy = [*user, {"role": "assistant", "content": "", "tool_calls": [call]}]
    opening = _ids(tokenizer.apply_chat_template(user, add_generation_prompt=False, **kwargs))
    full = _ids(
        tokenizer.apply_chat_template(dummy + tool_messages, add_generation_prompt=True, **kwargs)
    )
    if full[: len(opening)] != opening:
        raise ValueError(
            "the chat template renders a user message differently once an assistant turn "
            "follows it, so tool results cannot be appended to the tokens"
        )
    eos = getattr(tokenizer, "eos_token_ids", None)  # mlx-lm's wrapper: every EOS
    eos = {tokenizer.eos_token_id} if eos is None or isinstance(eos, int) else set(eos)
    ends = [i for i in range(len(opening), len(full)) if full[i] in eos]
    if not ends:
        raise ValueError("the chat template ends an assistant turn with no EOS token")
    return full[ends[0] + 1 :]


def _ids(encoded) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


# -- running tools ------------------------------------------------------------------------------


@dataclass
class ToolResult:
    """What one call gave: the tool message's `content`, the failure kind (FAILURES) or None,
    and whether the content was cut to the output limit."""

    name: str
    content: str
    failure: str | None = None
    truncated: bool = False

    def message(self) -> dict:
        """The tool message (TRL's: role tool, the tool's name, the content as text)."""
        return {"role": "tool", "name": self.name, "content": self.content}


class ToolTimeout(BaseException):
    """Raised inside a tool's thread once it overran its time limit (a BaseException, so the
    tool's own `except Exception` does not swallow it)."""


_TOOL_THREADS: dict[int, list[int]] = {}  # thread id -> [characters printed]


class _RoutedOutput:
    """sys.stdout / sys.stderr while tools run: what a tool's thread prints is counted and
    dropped; every other thread writes to the real stream."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        printed = _TOOL_THREADS.get(threading.get_ident())
        if printed is None:
            return self._stream.write(text)
        printed[0] += len(text)
        return len(text)

    def flush(self) -> None:
        if threading.get_ident() not in _TOOL_THREADS:
            self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _routed_output():
    if isinstance(sys.stdout, _RoutedOutput):
        yield
        return
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _RoutedOutput(stdout), _RoutedOutput(stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _stop_thread(thread: threading.Thread) -> None:
    """Raise ToolTimeout inside `thread` at its next Python instruction (CPython's
    PyThreadState_SetAsyncExc): a runaway loop stops instead of holding the GIL forever."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(ToolTimeout)
        )


def _error(name: str, kind: str, message: str) -> ToolResult:
    return ToolResult(name, str({"error": message}), failure=kind)


def run_call(
    call: ToolCall, functions: dict[str, Callable], timeout: float, max_chars: int
) -> ToolResult:
    """Run one parsed call: the function `call.name` of `functions` with its arguments, on a
    daemon thread for at most `timeout` seconds. The result's content is `str(value)` cut to
    `max_chars` characters, or TRL's `str({"error": message})` on any failure."""
    if call.failure is not None:
        return _error(call.name or "unknown", call.failure, call.error)
    fn = functions.get(call.name)
    if fn is None:
        return _error(call.name, "unknown_tool", f"Tool {call.name} not found.")
    try:
        inspect.signature(fn).bind(**call.arguments)
    except TypeError as error:
        return _error(call.name, "bad_call", f"bad arguments for {call.name}: {error}")
    except ValueError:  # a builtin without a signature: let the call say
        pass
    outcome: dict[str, Any] = {}

    def target():
        _TOOL_THREADS[threading.get_ident()] = [0]
        try:
            value = fn(**call.arguments)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
            outcome["value"] = value
        except ToolTimeout:
            pass
        except BaseException as error:  # any failure of the tool is reported, never raised
            outcome["error"] = error
        finally:
            _TOOL_THREADS.pop(threading.get_ident(), None)

    worker = threading.Thread(target=target, daemon=True, name=f"tool-{call.name}")
    with _routed_output():
        worker.start()
        worker.join(timeout)
    if worker.is_alive():
        _stop_thread(worker)
        return _error(call.name, "timeout", f"{call.name} timed out after {timeout:g}s")
    if "error" in outcome:
        error = outcome["error"]
        return _error(call.name, "exception", f"{type(error).__name__}: {error}")
    try:
        content = str(outcome.get("value"))
    except Exception as error:
        return _error(call.name, "exception", f"str() of the result failed: {error}")
    if len(content) > max_chars:
        cut = len(content) - max_chars
        return ToolResult(
            call.name, f"{content[:max_chars]}... [{cut} more characters]", None, True
        )
    return ToolResult(call.name, content)


async def _awaited(awaitable):
    return await awaitable


# -- the toolbox of a run -----------------------------------------------------------------------


@dataclass
class Toolbox:
    """Everything a multi-turn rollout needs about tools: the standalone functions, the
    environment factory (and its pool of objects), the call parser, and the limits."""

    tools: list[Callable]
    parser: Any
    timeout: float = 10.0
    max_output_chars: int = 2000
    max_iterations: int | None = None
    environment_factory: Callable | None = None
    pool: list = field(default_factory=list)

    def environments(self, n: int) -> list | None:
        """One environment object per rollout row, drawn from the pool (grown as needed;
        TRL: construct once, reset often); None without an environment factory."""
        if self.environment_factory is None:
            return None
        while len(self.pool) < n:
            self.pool.append(self.environment_factory())
        return self.pool[:n]

    def functions(self, environment=None) -> dict[str, Callable]:
        """Tool name -> callable for a row: the standalone tools, then its environment's."""
        methods = []
        if environment is not None:
            names = environment_tool_names(type(environment))
            methods = [getattr(environment, name) for name in names]
        return {fn.__name__: fn for fn in [*self.tools, *methods]}

    def schemas(self, environment=None) -> list[dict]:
        """The JSON schemas for the chat template's `tools=` argument, in TRL's order."""
        return [tool_schema(fn) for fn in self.functions(environment).values()]


def make_toolbox(
    tools: list[str],
    tokenizer,
    *,
    environment_factory: str | None = None,
    timeout: float = 10.0,
    max_output_chars: int = 2000,
    max_iterations: int | None = None,
    template_kwargs: dict | None = None,
) -> Toolbox:
    """The toolbox for `rollout.tools` and `rollout.environment_factory`, checked: every tool
    imports and has a schema, the environment has reset, the chat template renders tool calls
    and results and has a parser. Raises ValueError (one line) naming the problem."""
    functions = [resolve_tool(spec) for spec in tools]
    for fn in functions:
        tool_schema(fn)
    factory = resolve_environment_factory(environment_factory) if environment_factory else None
    check_tool_template(tokenizer, template_kwargs)
    return Toolbox(
        tools=functions,
        parser=tool_call_parser(tokenizer),
        timeout=timeout,
        max_output_chars=max_output_chars,
        max_iterations=max_iterations,
        environment_factory=factory,
    )
