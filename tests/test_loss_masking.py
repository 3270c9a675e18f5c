"""SFT loss-masking strategies (data.loss_on, data.train_on_eos) on real chat templates of several families.

The reference masks are computed here, independently of jaxsft: each assistant turn's span runs from the tokens of
the conversation rendered up to it (with the generation prompt) to those of the conversation rendered through it,
both by `tokenizer.apply_chat_template(..., tokenize=True)` (TRL's approach for templates without `{% generation %}`
markers, huggingface/trl#4879), and each family's end-of-turn text is written out by hand below.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, llm_tokenizer, make_tiny_decoder, write_jsonl

from jaxsft import config as config_lib
from jaxsft.defaults import base_config
from jaxsft.errors import UserError
from jaxsft.tasks import causal_lm

datasets = pytest.importorskip("datasets")

# ruff: noqa: E501 (the templates below keep the real files' lines)

# --- the chat templates, as their tokenizer_config.json files ship them (none has `{% generation %}` markers,
# except CHATML_GENERATION) -------------------------------------------------------------------------------------

# Qwen/Qwen2.5-*-Instruct (ChatML; a default system prompt when the conversation has none)
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# meta-llama/Llama-3.1-8B-Instruct
LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# google/gemma-2-2b-it (gemma-7b-it: the same); no system role
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

# mistralai/Mistral-7B-Instruct-v0.2 (Mixtral-8x7B-Instruct-v0.1: the same); [INST] as text, no system role, no
# generation prompt (the prompt ends with [/INST])
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# meta-llama/Llama-2-7b-chat-hf: [INST] with the system prompt in the first user turn, BOS before every user turn
# and EOS after every assistant turn
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# tiiuae/falcon-180B-chat: plain-text roles, turns closed by nothing but the next line (no special token)
FALCON = ("{% for message in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
          "{% if message['role'] == 'system' %}{{ 'System: ' }}{% elif message['role'] == 'user' %}{{ 'User: ' }}"
          "{% elif message['role'] == 'assistant' %}{{ 'Falcon: ' }}{% endif %}{{ message['content'] }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '\n' + 'Falcon:' }}{% endif %}")

# ChatML with TRL-style `{% generation %}` markers around each assistant reply and its end of turn: jaxsft ignores
# them (they render nothing), and transformers' return_assistant_tokens_mask is a second oracle
CHATML_GENERATION = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
                     "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\n' }}"
                     "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|eom_id|>", "<|python_tag|>"]
# name: (template, BOS the tokenizer puts in front (None: none), EOS, special tokens, the text closing an assistant
# turn inside its span, system role supported)
FAMILIES = {
    "qwen2.5": (QWEN25, None, "<|im_end|>", CHATML_SPECIALS, "<|im_end|>\n", True),
    "qwen2.5-base-eos": (QWEN25, None, "<|endoftext|>", CHATML_SPECIALS, "<|im_end|>\n", True),
    "llama3.1": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>", LLAMA3_SPECIALS, "<|eot_id|>", True),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>\n", False),
    "mistral": (MISTRAL, "<s>", "</s>", [], "</s>", False),
    "llama2": (LLAMA2, "<s>", "</s>", [], "</s>", True),
    "falcon": (FALCON, None, "<|endoftext|>", [], "", True),
    "chatml-generation": (CHATML_GENERATION, None, "<|endoftext|>", CHATML_SPECIALS, "<|im_end|>\n", True),
}

SYSTEM = {"role": "system", "content": "you answer in short sentences"}
EXCHANGES = [{"role": "user", "content": "what colour is the sky"},
             {"role": "assistant", "content": "the sky is blue"},
             {"role": "user", "content": "and the grass"},
             {"role": "assistant", "content": "the grass is green today"},
             {"role": "user", "content": "thanks for the help"},
             {"role": "assistant", "content": "you are welcome"}]


@functools.cache
def family_tokenizer(name: str):
    """conftest's llm_tokenizer (MiniLM's vocabulary) with the family's special tokens, BOS, EOS and template; "\\n"
    is a token of its own (MiniLM's normalizer would drop it), as in the families' real vocabularies."""
    from tokenizers import AddedToken, processors

    template, bos, eos, specials, _, _ = FAMILIES[name]
    tok = llm_tokenizer()
    tok.add_special_tokens({"eos_token": eos, "additional_special_tokens": list(specials)})
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    if bos is None:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
        tok.bos_token = None
    else:
        tok.add_special_tokens({"bos_token": bos})
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    tok.chat_template = template
    return tok


def conversation(name: str, system: bool = True) -> list[dict]:
    return ([SYSTEM] if system and FAMILIES[name][5] else []) + EXCHANGES


def chat_ids(tok, messages, generation_prompt: bool = False) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def text_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def reference(name: str, messages: list[dict], loss_on: str = "assistant", train_on_eos: bool = True):
    """(token ids, loss mask) of one conversation, from prefix renderings alone."""
    tok, closing = family_tokenizer(name), FAMILIES[name][4]
    ids = chat_ids(tok, messages)
    turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "last_turn":
        turns = turns[-1:]
    spans = []
    for j in turns:
        before, through = chat_ids(tok, messages[:j], True), chat_ids(tok, messages[:j + 1])
        assert ids[:len(before)] == before and ids[:len(through)] == through  # the template keeps prefixes
        # the span is the reply, then the template's end of turn
        assert ids[len(before):len(through)] == text_ids(tok, messages[j]["content"]) + text_ids(tok, closing)
        spans.append((len(before), len(through)))
    mask = [int(loss_on == "all")] * len(ids)
    for a, b in spans:
        mask[a:b] = [1] * (b - a)
        if not train_on_eos:
            n = len(text_ids(tok, closing))
            mask[b - n:b] = [0] * n
    a, b = spans[-1]
    if tok.eos_token_id not in ids[a:b]:  # every example ends with EOS: appended when the last turn has none
        trained = loss_on == "all" or turns[-1] == len(messages) - 1
        ids, mask = ids + [tok.eos_token_id], mask + [int(trained and train_on_eos)]
    return ids, mask


def cfg(**data):
    c = base_config()
    c.task, c.max_length = "causal_lm", 512
    c.data.packing = False
    for k, v in data.items():
        c.data[k] = v
    return c


def featurize(rows, tok, c):
    ds = datasets.Dataset.from_list(rows)
    causal_lm.resolve_labels(c, ds)
    return causal_lm.featurize(ds, tok, c, "data.train", "rows", need_labels=True)


def jaxsft_tokens(name: str, messages: list[dict], **data) -> tuple[list[int], list[int]]:
    f = featurize([{"messages": messages}], family_tokenizer(name), cfg(**data))
    return f.input_ids[0].tolist(), f.loss_tokens[0].tolist()


def runs(mask) -> list[tuple[int, int]]:
    at = np.flatnonzero(mask)
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(at, np.flatnonzero(np.diff(at) > 1) + 1) if len(r)]


# --- chat templates --------------------------------------------------------------------------------------------

STRATEGIES = [("assistant", True), ("assistant", False), ("last_turn", True), ("last_turn", False), ("all", True)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_loss_masks_equal_the_prefix_rendering_reference(name):
    systems = (True, False) if name.startswith("qwen") else (True,)  # Qwen also without a system turn (its default)
    for system in systems:
        conv = conversation(name, system)
        for loss_on, train_on_eos in STRATEGIES:
            want_ids, want_mask = reference(name, conv, loss_on, train_on_eos)
            got_ids, got_mask = jaxsft_tokens(name, conv, loss_on=loss_on, train_on_eos=train_on_eos)
            assert got_ids == want_ids, (name, loss_on, train_on_eos)
            assert got_mask == want_mask, (name, system, loss_on, train_on_eos)
        # the default is today's: every assistant turn, its end of turn and the closing EOS trained
        assert jaxsft_tokens(name, conv) == reference(name, conv)
        assert len(runs(reference(name, conv)[1])) == 3
        # data.train_on_prompt=True is data.loss_on=all
        assert jaxsft_tokens(name, conv, train_on_prompt=True) == reference(name, conv, "all")


@pytest.mark.parametrize("name", ["qwen2.5", "qwen2.5-base-eos", "llama3.1", "gemma", "mistral", "llama2", "falcon"])
def test_train_on_eos_false_masks_exactly_the_end_of_turn_tokens(name):
    tok, closing = family_tokenizer(name), FAMILIES[name][4]
    conv = conversation(name)
    ids, on = jaxsft_tokens(name, conv)
    _, off = jaxsft_tokens(name, conv, train_on_eos=False)
    assert ids == jaxsft_tokens(name, conv, train_on_eos=False)[0]  # the tokens stay, only the mask changes
    dropped = [ids[p] for p in np.flatnonzero(np.asarray(on) != np.asarray(off))]
    assert not set(np.flatnonzero(off)) - set(np.flatnonzero(on))
    appended = [] if tok.eos_token_id in text_ids(tok, closing) else [tok.eos_token_id]
    assert dropped == text_ids(tok, closing) * 3 + appended
    assert tok.convert_ids_to_tokens(dropped) == {
        "qwen2.5": ["<|im_end|>", "\n"] * 3,
        "qwen2.5-base-eos": ["<|im_end|>", "\n"] * 3 + ["<|endoftext|>"],
        "llama3.1": ["<|eot_id|>"] * 3,
        "gemma": ["<end_of_turn>", "\n"] * 3 + ["<eos>"],
        "mistral": ["</s>"] * 3,
        "llama2": ["</s>"] * 3,
        "falcon": ["<|endoftext|>"],  # plain-text turns: only the EOS jaxsft appends
    }[name]
    # what stays trained is exactly the three replies
    kept = [ids[a:b] for a, b in runs(off)]
    assert kept == [text_ids(tok, m["content"]) for m in conv if m["role"] == "assistant"]


def test_generation_markers_are_ignored_and_agree_with_transformers_assistant_masks():
    tok, conv = family_tokenizer("chatml-generation"), conversation("chatml-generation")
    ids, mask = jaxsft_tokens("chatml-generation", conv)
    enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(enc["input_ids"]) + [tok.eos_token_id]
    assert mask == list(enc["assistant_masks"]) + [1]
    assert sum(mask) == sum(len(text_ids(tok, m["content"] + "<|im_end|>\n")) for m in conv
                            if m["role"] == "assistant") + 1


def test_last_turn_trains_only_the_last_reply_and_all_every_token():
    tok, conv = family_tokenizer("llama3.1"), conversation("llama3.1")
    ids, mask = jaxsft_tokens("llama3.1", conv, loss_on="last_turn")
    assert [ids[a:b] for a, b in runs(mask)] == [text_ids(tok, "you are welcome<|eot_id|>")]
    ids, mask = jaxsft_tokens("llama3.1", conv, loss_on="all")
    assert all(mask) and ids[0] == tok.bos_token_id
    # a conversation ending in a user turn: its EOS closes no trained turn
    ids, mask = jaxsft_tokens("llama3.1", conv[:-1], loss_on="last_turn")
    assert ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>") and mask[-1] == 0  # <|eot_id|> is the EOS: none added
    assert [ids[a:b] for a, b in runs(mask)] == [text_ids(tok, "the grass is green today<|eot_id|>")]


def test_conversational_prompt_completion_last_turn_is_the_completions_last_reply():
    tok = family_tokenizer("qwen2.5")
    conv = conversation("qwen2.5")
    row = {"prompt": conv[:4], "completion": conv[4:]}  # completion: reply, user turn, reply
    f = featurize([row], tok, cfg())
    mask = f.loss_tokens[0].tolist()
    assert len(runs(mask)) == 2  # default: every turn of the completion, its user turn too (run on from the reply)
    f = featurize([row], tok, cfg(loss_on="last_turn"))
    ids, mask = f.input_ids[0].tolist(), f.loss_tokens[0].tolist()
    assert [ids[a:b] for a, b in runs(mask)] == [text_ids(tok, "you are welcome<|im_end|>\n")]


# --- plain formats ---------------------------------------------------------------------------------------------

PC = [{"prompt": "What is the capital of France?", "completion": " Paris, of course."}]
ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "five"}]


@pytest.mark.parametrize("rows", [PC, ALPACA], ids=["prompt_completion", "alpaca"])
def test_plain_formats_all_trains_the_prompt_and_last_turn_is_assistant(rows):
    tok = llm_tokenizer()  # no chat template: the prompt text (or the Alpaca prompt) + the completion
    base = featurize(rows, tok, cfg())
    ids, mask = base.input_ids[0].tolist(), base.loss_tokens[0].tolist()
    n = len(text_ids(tok, rows[0].get("completion", rows[0].get("output"))))
    assert mask == [0] * (len(ids) - n - 1) + [1] * (n + 1) and ids[-1] == tok.eos_token_id
    last = featurize(rows, tok, cfg(loss_on="last_turn"))
    assert last.input_ids[0].tolist() == ids and last.loss_tokens[0].tolist() == mask
    every = featurize(rows, tok, cfg(loss_on="all"))
    assert every.input_ids[0].tolist() == ids and every.loss_tokens[0].tolist() == [1] * len(ids)
    no_eos = featurize(rows, tok, cfg(train_on_eos=False))
    assert no_eos.input_ids[0].tolist() == ids and no_eos.loss_tokens[0].tolist() == mask[:-1] + [0]


def test_alpaca_through_a_chat_template_last_turn_is_assistant():
    tok = family_tokenizer("gemma")
    base = featurize(ALPACA, tok, cfg())
    for data in ({"loss_on": "last_turn"}, {}):
        f = featurize(ALPACA, tok, cfg(**data))
        assert f.loss_tokens[0].tolist() == base.loss_tokens[0].tolist()
    ids, mask = base.input_ids[0].tolist(), base.loss_tokens[0].tolist()
    assert tok.convert_ids_to_tokens([ids[j] for j in np.flatnonzero(mask)]) == \
        ["five", "<end_of_turn>", "\n", "<eos>"]
    off = featurize(ALPACA, tok, cfg(train_on_eos=False)).loss_tokens[0].tolist()
    assert [ids[j] for j in np.flatnonzero(off)] == text_ids(tok, "five")


def test_text_trains_every_token_and_train_on_eos_false_masks_the_appended_eos():
    tok = llm_tokenizer()
    rows = [{"text": "the cat sat on the mat"}]
    for loss_on in ("assistant", "last_turn", "all"):
        f = featurize(rows, tok, cfg(loss_on=loss_on))
        assert f.loss_tokens[0].tolist() == [1] * len(f.input_ids[0])
    f = featurize(rows, tok, cfg(train_on_eos=False))
    assert f.input_ids[0].tolist()[-1] == tok.eos_token_id
    assert f.loss_tokens[0].tolist() == [1] * (len(f.input_ids[0]) - 1) + [0]


# --- config checks ---------------------------------------------------------------------------------------------

def test_config_values_and_combinations_are_checked_in_one_line():
    config_lib.check_values(cfg(loss_on="last_turn", train_on_eos=False))
    config_lib.check_values(cfg(loss_on="all", train_on_prompt=True))
    cases = [({"loss_on": "prompt"}, r"^config\.data\.loss_on must be one of assistant, last_turn, all, got 'prompt'$"),
             ({"loss_on": "last_turn", "train_on_prompt": True}, r"^config\.data\.train_on_prompt=True .*last_turn"),
             ({"loss_on": "all", "train_on_eos": False}, r"^config\.data\.train_on_eos=False .*loss_on=all"),
             ({"train_on_prompt": True, "train_on_eos": False}, r"^config\.data\.train_on_eos=False .*train_on_prompt")]
    for data, pattern in cases:
        with pytest.raises(UserError, match=pattern) as e:
            config_lib.check_values(cfg(**data))
        assert "\n" not in str(e.value)
    c = cfg()  # a config.json written before the keys existed: today's masks
    del c.data["loss_on"], c.data["train_on_eos"]
    assert featurize(PC, llm_tokenizer(), c).loss_tokens[0].tolist() == \
        featurize(PC, llm_tokenizer(), cfg()).loss_tokens[0].tolist()


# --- end to end ------------------------------------------------------------------------------------------------

def cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"jaxsft.{module}", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})


def test_sft_cli_trains_on_the_last_turn(tmp_path):
    pytest.importorskip("torch")
    model = make_tiny_decoder(tmp_path / "llama")
    rows = [{"messages": [{"role": "user", "content": f"say {a}"}, {"role": "assistant", "content": a},
                          {"role": "user", "content": "and again"}, {"role": "assistant", "content": f"{a} {b}"}]}
            for a, b in (("good", "great"), ("fine", "dull"), ("awful", "bad"))] * 4
    write_jsonl(tmp_path / "chat.jsonl", rows)
    w = tmp_path / "w"
    args = ["run", "--config", "configs/sft.py", "--workdir", w, f"--config.model.name_or_path={model}",
            f"--config.data.train={tmp_path / 'chat.jsonl'}", "--config.max_steps=2", "--config.max_length=64",
            "--config.batch_size=4", "--config.dtype=float32", f"--config.data.chat_template={MISTRAL}",
            "--config.data.loss_on=last_turn", "--config.precompile=False"]
    bad = cli(*args, "--config.data.train_on_prompt=True")  # refused before anything is loaded or written
    assert bad.returncode == 2 and "data.loss_on='last_turn'" in bad.stderr.strip().splitlines()[-1]
    assert not w.exists()
    start = time.time()
    p = cli(*args, "--config.data.train_on_eos=False")
    assert p.returncode == 0, p.stderr[-3000:]
    saved = json.loads((w / "config.json").read_text())["data"]
    assert saved["loss_on"] == "last_turn" and saved["train_on_eos"] is False and saved["format"] == "messages"
    events = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if "loss" in e]
    assert losses and all(np.isfinite(losses))
    print(f"last_turn SFT run: {time.time() - start:.1f} s")
