"""Tools: the built-in evaluators, schemas, the tool-call parsers per chat-template family, the
template checks and suffix tokens, running a call (timeouts, errors, huge and printed output)
and the environment contract."""

import re
import sys
import threading
import time

from stages import tools
from stages.tiny_model import build_tokenizer

import pytest

# -- built-in tools -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, value",
    [
        ("1 + 2 * 3", "7"),
        ("(3 + 4) * 2", "14"),
        ("2 ** 10", "1024"),
        ("7 // 2 + 7 % 2", "4"),
        ("-3 + +1", "-2"),
        ("sqrt(16) + max(1, 5)", "9.0"),
        ("round(pi, 3)", "3.142"),
        ("123 + 456", "579"),
    ],
)
def test_calculator_evaluates_arithmetic(expression, value):
    assert tools.calculator(expression) == value


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os').system('echo hi')", "function \"__import__('os').system\""),
        ("open('x')", "function 'open' is not allowed"),
        ("x + 1", "name 'x' is not defined"),
        ("2 ** 100000", "is over 4096 bits"),
        ("1 / 0", "division by zero"),
        ("[1, 2]", "List is not allowed"),
        ("'a' * 3", "constant 'a' is not allowed"),
        ("1 +", "invalid syntax"),
        ("1" * 3000, "characters is over 2000"),
        ("1e308 * 10", "not a finite number"),
    ],
)
def test_calculator_refuses_what_is_not_arithmetic(expression, message):
    with pytest.raises((ValueError, ZeroDivisionError), match=re.escape(message)):
        tools.calculator(expression)


def test_python_eval_runs_pure_expressions_within_limits():
    assert tools.python_eval("sum(x * x for x in range(10))") == "285"
    assert tools.python_eval("sorted({'b': 1, 'a': 2})") == "['a', 'b']"
    assert tools.python_eval("[i for i in range(6) if i % 2][::-1]") == "[5, 3, 1]"
    assert tools.python_eval("'ab' * 2 if len('x') == 1 else None") == "'abab'"
    assert tools.python_eval("{k: v for k, v in zip('ab', [1, 2])}") == "{'a': 1, 'b': 2}"
    for expression, message in [
        ("(1).__class__", "Attribute is not allowed"),
        ("'x'.upper()", "function \"'x'.upper\" is not allowed"),
        ("range(10 ** 9)", "range of 1000000000 numbers is over the limit"),
        ("'a' * 10 ** 6", "a sequence of 1000000 items is over the limit"),
        ("[0] * 5000 * 5", "items is over the limit"),
        ("lambda: 1", "Lambda is not allowed"),
        ("[x for x in range(9000) for y in range(9000)]", "over"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            tools.python_eval(expression)


# -- schemas and resolving ------------------------------------------------------------------------


def test_schemas_come_from_type_hints_and_docstrings():
    schema = tools.tool_schema(tools.add)
    assert schema["function"]["name"] == "add"
    assert schema["function"]["parameters"]["properties"]["a"] == {
        "type": "integer",
        "description": "The first number.",
    }
    assert schema["function"]["parameters"]["required"] == ["a", "b"]


def untyped(a, b):
    """Add.

    Args:
        a: x
        b: y
    """
    return a + b


def undocumented(a: int) -> int:
    return a


def test_a_tool_without_type_hints_or_docstring_is_a_one_line_error():
    with pytest.raises(ValueError, match="tool untyped has no usable JSON schema: Argument a is"):
        tools.tool_schema(untyped)
    with pytest.raises(ValueError, match="tool undocumented has no usable JSON schema") as info:
        tools.tool_schema(undocumented)
    assert "\n" not in str(info.value)


def test_tools_resolve_by_name_or_import_path():
    assert tools.resolve_tool("calculator") is tools.calculator
    assert tools.resolve_tool("test_tools.untyped") is untyped
    with pytest.raises(ValueError, match="tool 'no_such.module.fn' cannot be imported: No module"):
        tools.resolve_tool("no_such.module.fn")
    with pytest.raises(ValueError, match="tool 'nope' is not a built-in"):
        tools.resolve_tool("nope")


# -- parsing calls --------------------------------------------------------------------------------


def test_qwen3_parser_reads_calls_and_says_what_is_wrong():
    parser = tools.Qwen3Parser()
    content, calls = parser.parse(
        'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1+1\\"}"}'
        "</tool_call>"
    )
    assert content == "Let me add."
    assert [(c.name, c.arguments, c.failure) for c in calls] == [
        ("add", {"a": 1, "b": 2}, None),
        ("calculator", {"expression": "1+1"}, None),
    ]
    assert parser.parse("just text") == ("just text", [])
    broken = [
        ('<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>', "invalid_json"),
        ('<tool_call>{"name": "add"', "invalid_json"),  # never closed
        ('<tool_call>{"arguments": {}}</tool_call>', "bad_call"),
        ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>', "bad_call"),
    ]
    for text, kind in broken:
        (call,) = parser.parse(text)[1]
        assert call.failure == kind, text
    (call,) = parser.parse('<tool_call>{"name": "f"}</tool_call>')[1]
    assert call.arguments == {} and call.failure is None  # TRL fills missing arguments


def test_qwen3_5_and_llama3_parsers():
    (call,) = tools.Qwen35Parser().parse(
        "<tool_call>\n<function=add>\n<parameter=a>\n12\n</parameter>\n"
        "<parameter=note>\nhi there\n</parameter>\n</function>\n</tool_call>"
    )[1]
    assert (call.name, call.arguments) == ("add", {"a": 12, "note": "hi there"})
    content, calls = tools.Llama3Parser().parse('{"name": "add", "parameters": {"a": 1, "b": 2}}')
    assert content == "" and (calls[0].name, calls[0].arguments) == ("add", {"a": 1, "b": 2})
    assert tools.Llama3Parser().parse("The answer is 3.") == ("The answer is 3.", [])


class _Template:
    def __init__(self, chat_template):
        self.chat_template = chat_template


def test_the_parser_is_chosen_from_the_chat_template():
    assert tools.tool_call_parser(build_tokenizer(tools=True)).family == "qwen3"
    qwen35 = "{{ '<tool_call>\\n<function=' + name + '>' }}"
    assert tools.tool_call_parser(_Template(qwen35)).family == "qwen3_5"
    llama = '{{ \'{"name": "\' + tool_call.name + \'", "parameters": \' }}'
    assert tools.tool_call_parser(_Template(llama)).family == "llama3"
    with pytest.raises(ValueError, match="writes tool calls in a format this pipeline does not"):
        tools.tool_call_parser(_Template("{{ messages }}"))


def test_template_without_tool_support_is_a_one_line_error():
    with pytest.raises(ValueError, match="chat template has no tool support") as info:
        tools.check_tool_template(build_tokenizer())  # the quickstart's template
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="the tokenizer has none"):
        tools.check_tool_template(_Template(None))
    tools.check_tool_template(build_tokenizer(tools=True))


def test_tool_suffix_is_the_templates_tokens_after_the_eos():
    tokenizer = build_tokenizer(tools=True)
    messages = [{"role": "tool", "name": "add", "content": "579"}]
    suffix = tools.tool_suffix_ids(tokenizer, messages)
    assert tokenizer.decode(suffix) == (
        "\n<|im_start|>user\n<tool_response>579</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    two = messages + [{"role": "tool", "name": "add", "content": "1"}]
    assert "579</tool_response><tool_response>1</tool_response>" in tokenizer.decode(
        tools.tool_suffix_ids(tokenizer, two)
    )


# -- running calls --------------------------------------------------------------------------------


def hangs(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "woke"


SPUN = {"iterations": 0}


def spins(n: int) -> int:
    """Busy loop forever.

    Args:
        n: ignored
    """
    while True:
        SPUN["iterations"] += 1


def raises(n: int) -> int:
    """Fail.

    Args:
        n: ignored
    """
    raise RuntimeError(f"broken {n}")


def chatty(n: int) -> str:
    """Print megabytes, return megabytes.

    Args:
        n: megabytes
    """
    for _ in range(n):
        print("x" * 1_000_000)
        sys.stderr.write("y" * 1_000_000)
    return "z" * (n * 1_000_000)


async def slow_double(n: int) -> int:
    """Double, asynchronously.

    Args:
        n: the number
    """
    return 2 * n


FUNCTIONS = {f.__name__: f for f in (tools.add, hangs, spins, raises, chatty, slow_double)}


def run(name, arguments, timeout=2.0, max_chars=100):
    return tools.run_call(tools.ToolCall(name, arguments), FUNCTIONS, timeout, max_chars)


def test_a_call_runs_and_its_result_is_text():
    result = run("add", {"a": 2, "b": 3})
    assert (result.content, result.failure, result.truncated) == ("5", None, False)
    assert result.message() == {"role": "tool", "name": "add", "content": "5"}
    assert run("slow_double", {"n": 21}).content == "42"


def test_every_failure_is_the_tool_message_and_counted_by_kind():
    cases = [
        (run("nope", {}), "unknown_tool", "{'error': 'Tool nope not found.'}"),
        (run("add", {"a": 1}), "bad_call", "missing a required argument: 'b'"),
        (run("raises", {"n": 7}), "exception", "{'error': 'RuntimeError: broken 7'}"),
    ]
    for result, kind, text in cases:
        assert result.failure == kind and text in result.content
    parsed = tools.ToolCall("", failure="invalid_json", error="invalid JSON in tool call: x")
    result = tools.run_call(parsed, FUNCTIONS, 1.0, 100)
    assert result.failure == "invalid_json" and "invalid JSON" in result.content


def test_a_hanging_tool_times_out_and_a_spinning_one_is_stopped():
    start = time.monotonic()
    result = run("hangs", {"seconds": 60}, timeout=0.3)
    assert time.monotonic() - start < 2.0
    assert result.failure == "timeout" and "hangs timed out after 0.3s" in result.content
    result = run("spins", {"n": 0}, timeout=0.3)
    assert result.failure == "timeout"
    time.sleep(0.3)
    seen = SPUN["iterations"]
    time.sleep(0.3)
    assert SPUN["iterations"] == seen  # the busy loop was stopped inside its thread
    assert not any(t.name == "tool-spins" for t in threading.enumerate())


def test_huge_and_printed_output_is_cut_and_never_reaches_the_console(capfd):
    start = time.monotonic()
    result = run("chatty", {"n": 3}, timeout=30, max_chars=50)
    assert time.monotonic() - start < 10
    assert result.truncated and result.failure is None
    assert result.content == "z" * 50 + "... [2999950 more characters]"
    out, err = capfd.readouterr()
    assert "x" not in out and "y" not in err
    print("after")  # the console is back
    assert capfd.readouterr().out == "after\n"


# -- environments ---------------------------------------------------------------------------------


class Counter:
    def __init__(self):
        self.total = 0

    def reset(self, **row):
        self.total = int(row.get("start", 0))
        return f" (starting at {self.total})"

    def increment(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: the amount
        """
        self.total += by
        return self.total

    def get_reward(self) -> float:
        return float(self.total == 10)

    def _private(self):
        return None

    @property
    def shown(self):
        raise AssertionError("properties are never evaluated")


class NoReset:
    def step(self, x: int) -> int:
        """Step.

        Args:
            x: x
        """
        return x


def test_environment_methods_are_its_tools_and_get_reward_a_reward():
    factory = tools.resolve_environment_factory("test_tools.Counter")
    assert tools.environment_tool_names(Counter) == ["increment"]
    toolbox = tools.Toolbox(
        tools=[tools.add], parser=tools.Qwen3Parser(), environment_factory=factory
    )
    first, second = toolbox.environments(2)
    assert first is not second and toolbox.environments(1)[0] is first  # pooled
    functions = toolbox.functions(first)
    assert list(functions) == ["add", "increment"]
    assert [s["function"]["name"] for s in toolbox.schemas(first)] == ["add", "increment"]
    functions["increment"](by=4)
    assert first.total == 4 and second.total == 0  # each row's tools act on its own object
    reward = tools.environment_reward(factory)
    first.total = 10
    assert reward.__name__ == "Counter"
    assert reward(prompts=[], completions=[], environments=[first, second]) == [1.0, 0.0]


def test_an_environment_without_reset_is_a_one_line_error():
    with pytest.raises(ValueError, match="makes NoReset objects with no callable reset") as info:
        tools.resolve_environment_factory("test_tools.NoReset")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="environment_factory 'nowhere.Env' cannot be imported"):
        tools.resolve_environment_factory("nowhere.Env")


def test_qwen3s_own_template_renders_tools_and_its_suffix_is_found():
    """Qwen3's chat template (tests/fixtures/qwen3_chat_template.jinja, as Qwen/Qwen3-0.6B ships
    it; TRL keeps the same copy) drops the empty <think> block of an assistant turn once tool
    messages follow it, which TRL's prefix check rejects; the suffix after the turn's EOS is
    still exactly the template's tool block and generation prompt."""
    from pathlib import Path

    tokenizer = build_tokenizer(tools=True)
    template = Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja"
    tokenizer.chat_template = template.read_text()
    tools.check_tool_template(tokenizer)
    assert tools.tool_call_parser(tokenizer).family == "qwen3"
    messages = [{"role": "tool", "name": "add", "content": "579"}]
    block = "\n<|im_start|>user\n<tool_response>\n579\n</tool_response><|im_end|>\n"
    assert tokenizer.decode(tools.tool_suffix_ids(tokenizer, messages)) == (
        block + "<|im_start|>assistant\n"
    )
    no_thinking = tools.tool_suffix_ids(tokenizer, messages, {"enable_thinking": False})
    assert tokenizer.decode(no_thinking) == block + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
