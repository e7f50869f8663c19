"""Fuzz target: hostile chat templates in the sandbox (structured, Hypothesis).

A checkpoint's chat template is code from a stranger. Templates are composed from fragments
that try to escape the sandbox (dunder chains, `cycler.__init__.__globals__`, format-string
attribute access, mutating the messages), to run forever (`range(10**9)`, nested loops,
recursive macros and loops), to blow up memory or output (string and list products, padding
filters, huge powers) or to reach files (include/import/extends), mixed with ordinary Jinja.
Contract: `render_template` returns a string of at most MAX_OUTPUT_CHARS, or a one-line
ChatTemplateError, within the CPU budget; it never mutates the messages, and no output shows a
way into the interpreter (module objects, builtins, object's class).
"""

from __future__ import annotations

import copy

from _harness import Structured, instrumented, main_structured, run_contract

with instrumented(("gemmarun", "jinja2")):
    from hypothesis import strategies as st

    from gemmarun.chat import MAX_OUTPUT_CHARS, MAX_SECONDS, ChatTemplateError, render_template

NAME = "chat_template"
SECONDS_PER_INPUT = 4 * MAX_SECONDS  # CPU time; the sandbox's own deadline is MAX_SECONDS
# What only a sandbox escape can print (the template fragments never spell these out).
ESCAPE_MARKERS = ("<class 'object'>", "__builtins__", "<module ", "<built-in function", "__import__",
                  "<class 'type'>", "<class 'function'>", "_io.", "posix")

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello.", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
            {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image"}]}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]

ATOMS = ["messages", "messages[0]", "messages[0].content", "messages[-1].content", "tools", "bos_token",
         "'x'", "''", "1", "10**9", "10**6", "2**64", "-1", "none", "true", "[1, 2]", "{'a': 1}",
         "range(10**9)", "range(5)", "cycler", "joiner", "namespace", "dict", "raise_exception",
         "strftime_now", "loop", "self", "caller", "x", "ns", "ns.a", "varargs", "kwargs", "config", "request"]
ATTRS = ["__class__", "__mro__", "__subclasses__", "__init__", "__globals__", "__dict__", "__code__",
         "__builtins__", "__self__", "__func__", "__base__", "__bases__", "_TemplateReference__context",
         "__getitem__", "__reduce__", "gi_frame", "f_globals", "mro", "format", "format_map", "append",
         "update", "pop", "clear", "extend", "insert", "setdefault", "__setitem__", "items", "keys",
         "upper", "split", "join", "replace", "center", "ljust", "zfill", "expandtabs", "encode", "environment",
         "os", "popen", "system", "eval", "_module", "module", "func_globals", "content", "role"]
ARGS = ["", "1", "10**9", "'x'", "'{0.__class__}'", "'{0.__class__.__mro__}'", "'%s' * 10**6",
        "[1] * 10**8", "'x', 'y' * 10**6", "10**9, 'x'", "x=1", "__class__=1", "messages"]
FILTERS = ["upper", "list", "sort", "unique", "reverse", "sum", "first", "last", "length", "string", "int",
           "float", "trim", "tojson", "tojson(indent=10**9)", "pprint", "urlize", "xmlattr", "dictsort",
           "items", "title", "wordcount", "join", "join('x' * 10**6)", "center(10**9)", "indent(10**9)",
           "wordwrap(1)", "batch(10**9)", "slice(10**9)", "format('x')", "replace('', 'x' * 10**6)",
           "map('upper')", "map(attribute='__class__')", "attr('__class__')", "selectattr('role')",
           "groupby('role')", "truncate(10**9)", "default('x')", "random", "striptags", "escape",
           "forceescape", "safe", "filesizeformat", "round", "abs", "capitalize", "min", "max"]
OPS = [" ~ ", " + ", " * ", " ** ", " % ", " // ", " / ", " - ", " == ", " in ", " and ", " or "]
TEXT = ["x", "<|turn>", "{{", "%}", "\n", "<bos>", "\u2581"]


def expressions() -> st.SearchStrategy[str]:
    atom = st.sampled_from(ATOMS)
    return st.recursive(atom, lambda inner: st.one_of(
        st.builds(lambda e, a: f"{e}.{a}", inner, st.sampled_from(ATTRS)),
        st.builds(lambda e, a: f"{e}[{a!r}]", inner, st.sampled_from(ATTRS)),
        st.builds(lambda e, a: f"{e}({a})", inner, st.sampled_from(ARGS)),
        st.builds(lambda e, f: f"{e} | {f}", inner, st.sampled_from(FILTERS)),
        st.builds(lambda a, op, b: f"({a}{op}{b})", inner, st.sampled_from(OPS), inner),
        st.builds(lambda e: f"[{e}] * 10**7", inner),
        st.builds(lambda e: f"{e} if {e} else {e}", inner),
    ), max_leaves=6)


def statements() -> st.SearchStrategy[str]:
    expr = expressions()
    leaf = st.one_of(
        st.builds(lambda e: "{{ " + e + " }}", expr),
        st.builds(lambda e: "{% set x = " + e + " %}", expr),
        st.builds(lambda e: "{% set ns = namespace(a=" + e + ") %}{% set ns.a = ns.a ~ ns.a %}", expr),
        st.sampled_from(TEXT),
        st.sampled_from([
            "{% include 'x' %}", "{% import 'os' as os %}", "{% extends 'base' %}", "{% from 'x' import y %}",
            "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
            "{% macro f(n) %}{{ f(n - 1) ~ f(n - 1) }}{% endmacro %}{{ f(40) }}",
            "{% for i in [1] recursive %}{{ loop([1]) }}{% endfor %}",
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "{% raw %}{{ x }}{% endraw %}", "{% generation %}x{% endgeneration %}",
            "{{ raise_exception('boom') }}", "{{ strftime_now('%Y' * 10**6) }}",
        ]),
    )
    return st.recursive(leaf, lambda inner: st.one_of(
        st.builds(lambda a, b: a + b, inner, inner),
        st.builds(lambda e, b: "{% for i in " + e + " %}" + b + "{% endfor %}", expr, inner),
        st.builds(lambda e, b: "{% if " + e + " %}" + b + "{% else %}x{% endif %}", expr, inner),
        st.builds(lambda b: "{% filter upper %}" + b + "{% endfilter %}", inner),
        st.builds(lambda b: "{% set t %}" + b + "{% endset %}{{ t ~ t }}", inner),
        st.builds(lambda b: "{% macro m() %}" + b + "{% endmacro %}{% call m() %}x{% endcall %}{{ m() ~ m() }}", inner),
        st.builds(lambda b: "{% with y = 1 %}" + b + "{% endwith %}", inner),
    ), max_leaves=5)


def _render(template: str) -> None:
    messages, tools = copy.deepcopy(MESSAGES), copy.deepcopy(TOOLS)
    out = render_template(template, messages, tools=tools)
    assert messages == MESSAGES and tools == TOOLS, "the template mutated its input"
    assert len(out) <= MAX_OUTPUT_CHARS, f"{len(out)} chars rendered"
    leak = next((m for m in ESCAPE_MARKERS if m in out), None)
    assert leak is None, f"sandbox escape: the output shows {leak!r}"


def check(template: str) -> None:
    run_contract(lambda: _render(template), (ChatTemplateError,), SECONDS_PER_INPUT)


TARGET = Structured(statements(), check)

if __name__ == "__main__":
    main_structured(NAME, TARGET, max_len=8192)
