"""Group B of the test catalogue: chat templates rendered in the sandbox.

Normal templates give the expected prompts; known sandbox-escape payloads,
resource bombs and broken templates all raise ``TemplateError`` without
touching a canary file, within the time budget.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

import pytest
from gguf import GGUFValueType as VT

import gguf_factory as gf
import mullama
from mullama.chat_template import MAX_SOURCE_BYTES, render_chat_template

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there "},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
FAST = {"time_limit": 0.3}  # keeps the time-limit cases short


def test_chatml_template() -> None:
    out = render_chat_template(CHATML, MESSAGES[:2])
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there <|im_end|>\n"
                   "<|im_start|>assistant\n")
    assert not render_chat_template(CHATML, MESSAGES[:1], add_generation_prompt=False).endswith("assistant\n")


def test_gemma_template() -> None:
    out = render_chat_template(GEMMA, MESSAGES, bos_token="<bos>")
    assert out == ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!"
                   "<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n")


def test_raise_exception_becomes_template_error() -> None:
    with pytest.raises(mullama.TemplateError, match="roles must alternate"):
        render_chat_template(GEMMA, [{"role": "assistant", "content": "x"}])


def test_hugging_face_globals_and_extensions() -> None:
    tmpl = ("{{ tools is none }}|{{ enable_thinking }}|{{ strftime_now('%Y') | length }}|"
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
            "{% generation %}{{ eos_token }}{% endgeneration %}|{{ messages | map(attribute='role') | join(',') }}|"
            "{{ messages[1].content.strip().upper() }}|{{ {'a': [1, 2]} | tojson }}|{{ '%s-%d' % ('a', 3) }}|"
            "{{ '<tok{}>'.format(1) }}")
    out = render_chat_template(tmpl, MESSAGES[:2], eos_token="</s>", enable_thinking=False)
    assert out == 'True|False|4|system|</s>|system,user|HI THERE|{"a": [1, 2]}|a-3|<tok1>'
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert render_chat_template("{{ tools[0].function.name }}", [], tools=tools) == "f"


def test_caller_objects_are_not_reachable() -> None:
    msgs = [{"role": "user", "content": "x", "meta": {"k": [1]}}]
    with pytest.raises(mullama.TemplateError):
        render_chat_template("{{ messages[0].meta.k.append(2) }}", msgs)
    assert msgs == [{"role": "user", "content": "x", "meta": {"k": [1]}}]
    with pytest.raises(TypeError):
        render_chat_template(CHATML, [{"role": "user", "content": object()}])
    with pytest.raises(TypeError):
        render_chat_template(CHATML, [{"content": "no role"}])


def test_concurrent_renders_are_independent() -> None:
    expected = render_chat_template(GEMMA, MESSAGES, bos_token="<bos>")
    results: list[str] = []

    def work() -> None:
        for _ in range(20):
            results.append(render_chat_template(GEMMA, MESSAGES, bos_token="<bos>"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 80


def test_long_conversations_render_in_full() -> None:
    # the output limit grows with the input: 3 MB of messages still render
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 6000} for i in range(100)]
    out = render_chat_template(CHATML, msgs)
    assert out.count("<|im_start|>") == 101 and len(out) > 3_000_000


# ---------------------------------------------------------------- escapes and bombs

# {canary} is replaced by a path in tmp_path; none of these may create it.
ESCAPES = {
    "str-mro-subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler-globals-os": "{{ cycler.__init__.__globals__.os.popen('touch {canary}').read() }}",
    "template-reference-context": "{{ self._TemplateReference__context }}",
    "lipsum-globals-os": "{{ lipsum.__globals__['os'].system('touch {canary}') }}",
    "for-over-subclasses": "{% for x in ().__class__.__base__.__subclasses__() %}{{ x }}{% endfor %}",
    "attr-filter-globals": "{{ cycler|attr('__init__')|attr('__globals__') }}",
    "attr-filter-on-undefined": "{{ lipsum|attr('__globals__') }}",
    "joiner-globals": "{{ joiner.__init__.__globals__['os'].system('touch {canary}') }}",
    "namespace-globals": "{{ namespace.__init__.__globals__ }}",
    "request-object": "{{ request.application.__globals__.__builtins__.__import__('os').popen('touch {canary}') }}",
    "config-object": "{{ config.__class__.__init__.__globals__['os'].popen('touch {canary}') }}",
    "config-items": "{{ config.items() }}",
    "getitem-dunder": "{{ messages['__class__'] }}",
    "str-format-attribute": "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "format-map": "{{ '{x.__class__}'.format_map({'x': messages}) }}",
    "indirect-format": "{% set f = '{0.__class__.__base__}'.format %}{{ f(1) }}",
    "format-index-dunder": "{{ '{0[__class__]}'.format({'__class__': 1}) }}",
    "list-append": "{{ messages.append(1) }}",
    "dict-update": "{{ messages[0].update({'role': 'x'}) }}",
    "dict-pop": "{{ messages[0].pop('role') }}",
    "loop-internals": "{% for m in messages %}{{ loop._iterator }}{% endfor %}",
    "macro-func-globals": "{% macro m() %}{% endmacro %}{{ m._func.__globals__ }}",
    "raise-exception-globals": "{{ raise_exception.__globals__ }}",
    "strftime-globals": "{{ strftime_now.__globals__['datetime'] }}",
    "range-dunder": "{{ range.__self__ }}",
    "encode-bytes": "{{ 'x'.encode('utf-8') }}",
    "int-to-bytes": "{{ (10).to_bytes(1000000000, 'big') }}",
    "type-methods": "{{ dict.fromkeys(range(100000), 'x' * 100000) }}",
    "cycler-class-methods": "{{ cycler.mro() }}",
    "import-statement": "{% import 'os' as os %}{{ os.system('touch {canary}') }}",
    "include-file": "{% include '/etc/passwd' %}",
    "extends-file": "{% extends '/etc/passwd' %}",
}
BOMBS = {
    "range-10^9": "{{ range(10**9)|list|length }}",
    "nested-huge-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "triple-loop-shared-range": ("{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% for c in r %}"
                                 "{% endfor %}{% endfor %}{% endfor %}"),
    "string-times-10^8": "{{ 'x' * 100000000 }}",
    "string-times-10^9": "{{ 'a' * 10**9 }}",
    "list-times-10^8": "{{ [0] * 100000000 }}",
    "int-power": "{{ 2 ** 100000000 }}",
    "int-product-loop": ("{% set ns = namespace(n=3) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}"
                         "{% endfor %}"),
    "concat-doubling": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s|length }}"),
    "plus-doubling": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}"),
    "list-doubling-by-reference": ("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}"
                                   "{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l == ns.l|list }}"),
    "set-block-accumulation": ("{% set x %}{% for i in range(100000) %}{% for j in range(100000) %}"
                               "{{ 'a' * 1000 }}{% endfor %}{% endfor %}{% endset %}{{ x|length }}"),
    "recursive-macro": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "fan-out-macro": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                      "{{ f(60) }}"),
    "printf-width": "{{ '%0999999999d' % 1 }}",
    "str-format-width": "{{ '{:>999999999}'.format(1) }}",
    "str-format-computed-width": "{{ '{:>{}}'.format(1, 999999999) }}",
    "printf-star-width": "{{ '%*d' % (999999999, 1) }}",
    "format-filter-width": "{{ '%999999999s'|format('x') }}",
    "replace-empty": "{{ ('a' * 100000).replace('', 'b' * 100000) }}",
    "replace-filter-empty": "{{ ('a' * 100000)|replace('', 'b' * 100000) }}",
    "join-generator": "{{ range(100000)|map('string')|map('replace', '1', 'x' * 100000)|join }}",
    "str-join-multiplies": "{{ ('x' * 1000).join(range(100000)|map('string')|list) }}",
    "indent-width": "{{ ('a\n' * 100000)|indent(100000) }}",
    "tojson-indent": "{{ messages|tojson(indent=100000) }}",
    "sum-of-lists": "{{ range(100000)|batch(1)|sum(start=[]) }}",
    "center-filter": "{{ 'x'|center(1000000000) }}",
    "ljust-method": "{{ 'x'.ljust(1000000000) }}",
    "strftime-width": "{{ strftime_now('%999999999Y') }}",
    "output-flood": "{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}",
    "deep-nesting": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "syntax-error": "{% if %}",
    "undefined-filter": "{{ 1|no_such_filter }}",
    "division-by-zero": "{{ 1 / 0 }}",
    "divisibleby-zero": "{{ 4 is divisibleby 0 }}",
}


@pytest.mark.parametrize("case", list(ESCAPES) + list(BOMBS))
def test_malicious_template_is_stopped(case: str, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    source = (ESCAPES.get(case) or BOMBS[case]).replace("{canary}", str(canary))
    start = time.monotonic()
    with pytest.raises(mullama.TemplateError):
        render_chat_template(source, MESSAGES, **FAST)
    # generous: the budget is 0.3 s; what matters is that nothing runs unbounded
    assert time.monotonic() - start < 5.0
    assert not canary.exists()


def test_template_source_and_output_limits() -> None:
    with pytest.raises(mullama.TemplateError, match="larger than"):
        render_chat_template("x" * (MAX_SOURCE_BYTES + 1), MESSAGES)
    assert render_chat_template("x" * MAX_SOURCE_BYTES, MESSAGES) == "x" * MAX_SOURCE_BYTES
    with pytest.raises(mullama.TemplateError):
        render_chat_template("{% for i in range(200) %}0123456789{% endfor %}", [], max_output=1000)
    assert len(render_chat_template("{% for i in range(90) %}0123456789{% endfor %}", [], max_output=1000)) == 900


def test_time_limit_is_enforced_promptly() -> None:
    start = time.monotonic()
    with pytest.raises(mullama.TemplateError, match="ran for more than"):
        render_chat_template("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}"
                             "{% endfor %}", [], time_limit=0.2)
    assert time.monotonic() - start < 2.0


# ---------------------------------------------------------------- through Model


@functools.cache
def tiny_with_template(template: str) -> bytes:
    return gf.tiny_model_bytes(kv={"tokenizer.chat_template": (template, VT.STRING)})


def _load(tmp_path: Path, template: str) -> mullama.Model:
    path = tmp_path / "tiny-template.gguf"
    path.write_bytes(tiny_with_template(template))
    return mullama.Model.load(str(path))


def test_model_renders_its_gguf_template(tmp_path: Path) -> None:
    with _load(tmp_path, GEMMA) as model:
        assert model.chat_template == GEMMA
        out = model.apply_chat_template(MESSAGES)
        # bos_token comes from the vocabulary (<s> in the tiny model)
        assert out == render_chat_template(GEMMA, MESSAGES, bos_token="<s>", eos_token="</s>")
        assert out.startswith("<s><start_of_turn>user\nBe brief.")
        # an explicit template wins over the stored one; a name picks llama.cpp's built-in
        assert model.apply_chat_template(MESSAGES[:2], template=CHATML).startswith("<|im_start|>system")
        builtin = model.apply_chat_template(MESSAGES[:2], template="chatml")
        assert builtin == render_chat_template(CHATML, MESSAGES[:2])
        # a built-in template knows no tools: they are described in the system turn instead
        with_tools = model.apply_chat_template(MESSAGES[:2], template="chatml", tools=[{"name": "f"}])
        assert '"name": "f"' in with_tools and with_tools.startswith("<|im_start|>system\nBe brief.")
        with pytest.raises(mullama.TemplateError):
            model.apply_chat_template(MESSAGES[:2], template="chatml", enable_thinking=False)


def test_malicious_gguf_template_is_contained(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    evil = "{{ cycler.__init__.__globals__.os.popen('touch " + str(canary) + "').read() }}"
    with _load(tmp_path, evil) as model:
        with pytest.raises(mullama.TemplateError):
            model.apply_chat_template(MESSAGES)
    assert not canary.exists()
