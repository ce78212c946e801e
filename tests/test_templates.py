"""Model folders' chat templates and tokenizers as transformers reads them: real templates
(written here in the style of Llama-3.1's, Mistral-Instruct-v0.3's and Qwen2.5's), the loss mask
of data/chat/prepare.py against return_assistant_tokens_mask, special tokens from
special_tokens_map.json, BERT vocabularies' [CLS] ... [SEP], and what git ignores."""

import importlib.util
import json
import os
import subprocess

import pytest
from transformers import AutoTokenizer, GPT2Config

from conftest import REPO, assert_user_error, run_script, tiny_bpe
from nanogpt.errors import UserError

SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<s>", "</s>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"]

# Llama-3.1's: a system header with the knowledge date, and tool calls tested by `'tool_calls' in message`
LLAMA31 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}' }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

# Mistral-Instruct-v0.3's: the system prompt goes into the LAST user turn, so an earlier turn is
# written differently once the conversation goes on
MISTRAL = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token }}
    {%- endif %}
{%- endfor %}"""
MISTRAL_TRACKED = MISTRAL.replace('{{- " " + message["content"]|trim + eos_token }}',
                                  '{% generation %}{{- " " + message["content"]|trim + eos_token }}{% endgeneration %}')

# Qwen2.5's: an assistant turn is '<|im_start|>assistant', then '\n' + its content; the training
# version marks everything after the role as the assistant's
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + tool_call.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""
QWEN25_TRAINING = QWEN25.replace(
    """{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}""",
    """{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant' }}{% generation %}{{- '\\n' + message.content + '<|im_end|>\\n' }}{% endgeneration %}"""
    """{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}""")

SYSTEM = {"role": "system", "content": "Answer as a herald would."}
CHATS = [
    [{"role": "user", "content": "Who is the Prince of Denmark?"},
     {"role": "assistant", "content": "Hamlet, my lord."},
     {"role": "user", "content": "And his father?"},
     {"role": "assistant", "content": "  The late King, whose ghost walks. "}],
    [SYSTEM, {"role": "user", "content": "Who is the Prince of Denmark?"},
     {"role": "assistant", "content": "Hamlet, my lord."},
     {"role": "user", "content": "And his father?"},
     {"role": "assistant", "content": "The late King, whose ghost walks."}],
]


def model_folder(path, template, settings=None, special_tokens_map=None):
    """A model folder as the hub has them, without weights: config.json, tokenizer.json, and
    tokenizer_config.json with the chat template (settings: more of its keys)."""
    path.mkdir()
    tok = tiny_bpe()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    GPT2Config(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=1, n_embd=8).save_pretrained(path)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **(settings or {})}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if special_tokens_map is not None:
        (path / "special_tokens_map.json").write_text(json.dumps(special_tokens_map), encoding="utf-8")
    return path


def ours(folder):
    from nanogpt.checkpoint import load_tokenizer
    return load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def chat_prepare():
    """data/chat/prepare.py as a module."""
    spec = importlib.util.spec_from_file_location("chat_prepare", os.path.join(REPO, "data", "chat", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_mask_equals_transformers(chat_prepare, tok, tracked_folder, conversation):
    """Our ids and loss mask of a conversation are transformers' with the {% generation %}
    template, and the mask marks something."""
    theirs = AutoTokenizer.from_pretrained(tracked_folder).apply_chat_template(
        conversation, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = chat_prepare.encode_with_mask(tok, conversation)
    assert ids == list(theirs["input_ids"]) + [tok.eot_token]
    assert mask == list(theirs["assistant_masks"]) + [0]
    assert 0 < sum(mask) < len(mask)


def write_chats(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    return path


# -----------------------------------------------------------------------------
# None-valued keys, and templates that fail

def test_none_valued_keys_are_dropped_as_transformers_drops_them(tmp_path):
    folder = model_folder(tmp_path / "llama", LLAMA31, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    conversation = [{"role": "user", "content": "Hi", "name": None},
                    {"role": "assistant", "content": "Well met.", "tool_calls": None}]
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(conversation, tokenize=False)
    assert ours(folder).apply_chat_template(conversation) == expected
    assert "Well met.<|eot_id|>" in expected


def test_prepare_takes_openai_logs_and_any_template_failure_is_one_line_naming_the_line(tmp_path):
    folder = model_folder(tmp_path / "llama", LLAMA31, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    good = [[{"role": "user", "content": f"What is {i} and {i}?"},
             {"role": "assistant", "content": f"{2 * i}.", "tool_calls": None}] for i in range(10)]
    result = run_script("data/chat/prepare.py", f"--input={write_chats(tmp_path / 'chats.jsonl', good)}",
                        f"--tokenizer={folder}", f"--out={tmp_path / 'data'}")
    assert result.returncode == 0, result.stderr
    # a tool call given as a number: the template's `tool_calls|length` raises a TypeError
    broken = good[:2] + [[good[0][0], dict(good[0][1], tool_calls=3)]] + good[3:]
    result = run_script("data/chat/prepare.py", f"--input={write_chats(tmp_path / 'broken.jsonl', broken)}",
                        f"--tokenizer={folder}", f"--out={tmp_path / 'broken'}")
    assert_user_error(result, "broken.jsonl, line 3", "TypeError")
    assert not (tmp_path / "broken").exists()
    with pytest.raises(UserError, match="TypeError"):
        ours(folder).apply_chat_template(broken[2])


# -----------------------------------------------------------------------------
# special tokens

@pytest.mark.parametrize("decoder", [False, True])
def test_special_tokens_map_is_read_as_transformers_reads_it(tmp_path, decoder):
    """An older folder names its special tokens only in special_tokens_map.json; where
    tokenizer_config.json lists added_tokens_decoder, transformers reads the map no more."""
    template = LLAMA31 + "{{ eos_token }}"
    settings = {"eos_token": "<|eot_id|>"}
    if decoder:
        settings.update(bos_token="<|begin_of_text|>", added_tokens_decoder={
            "400": {"content": "<|begin_of_text|>", "special": True, "lstrip": False, "rstrip": False,
                    "normalized": False, "single_word": False}})
    mapped = {"bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False}, "eos_token": "</s>"}
    folder = model_folder(tmp_path / "llama", template, settings, mapped)
    conversation = CHATS[1][:3]
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(conversation, tokenize=False)
    assert ours(folder).apply_chat_template(conversation) == expected
    assert expected.startswith("<|begin_of_text|>") and expected.endswith("<|eot_id|>" if decoder else "</s>")


# -----------------------------------------------------------------------------
# the loss mask: transformers' {% generation %} markers

def test_a_template_whose_earlier_turns_change_is_masked_as_transformers_masks_it(tmp_path, chat_prepare):
    """Mistral's template with a system prompt: our mask of the plain template is transformers'
    return_assistant_tokens_mask with the {% generation %} version, with or without a system."""
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    tok = ours(model_folder(tmp_path / "mistral", MISTRAL, special))
    tracked = model_folder(tmp_path / "tracked", MISTRAL_TRACKED, special)
    for conversation in CHATS:
        assert_mask_equals_transformers(chat_prepare, tok, tracked, conversation)


def test_a_conversation_whose_spans_cannot_be_found_is_refused_naming_its_line(tmp_path):
    """A template that writes an assistant's content twice, and earlier turns differently as
    the conversation grows: no way finds the spans, and the error names the line."""
    echo = ("{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
            "{{ 'last: ' + messages[-1].content }}")
    folder = model_folder(tmp_path / "echo", echo)
    chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": f"Hello {i}"}] for i in range(10)]
    result = run_script("data/chat/prepare.py", f"--input={write_chats(tmp_path / 'chats.jsonl', chats)}",
                        f"--tokenizer={folder}", f"--out={tmp_path / 'data'}")
    assert_user_error(result, "chats.jsonl, line 1", "message 2")
    assert not (tmp_path / "data").exists()


def test_a_training_template_is_masked_by_its_generation_markers(tmp_path, chat_prepare):
    """Qwen2.5's training template marks the newline after <|im_start|>assistant as the
    assistant's: the mask follows the markers, as transformers' does."""
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    folder = model_folder(tmp_path / "qwen", QWEN25_TRAINING, special)
    tok = ours(folder)
    for conversation in CHATS:
        assert_mask_equals_transformers(chat_prepare, tok, folder, conversation)
    # the markers change no text: the training template writes what Qwen2.5's own writes
    plain = ours(model_folder(tmp_path / "plain", QWEN25, special))
    assert all(tok.apply_chat_template(c) == plain.apply_chat_template(c) for c in CHATS)


# -----------------------------------------------------------------------------
# BERT vocabularies (the Chinese GPT-2s)

def test_bert_vocabulary_export_wraps_texts_as_the_source_folder_does(tmp_path):
    from nanogpt.hf import tokenizer_files
    source = tmp_path / "gpt2-chinese"
    source.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"床前明月光疑是地上霜", "白", "日", "依"]
    (source / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": True}))
    GPT2Config(vocab_size=len(vocab), n_layer=1, n_head=1, n_embd=8).save_pretrained(source)
    tok = ours(source)
    for name, data in tokenizer_files(tok, 64).items():
        (tmp_path / "export" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "export" / name).write_bytes(data)
    original, exported = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(tmp_path / "export")
    assert original("白日")["input_ids"] == exported("白日")["input_ids"] == [2, 15, 16, 3]
    assert original("白日", "依")["input_ids"] == exported("白日", "依")["input_ids"]
    # our encode is transformers' add_special_tokens=False: the caller chooses the wrapping
    assert tok.encode("白日") == original("白日", add_special_tokens=False)["input_ids"] == [15, 16]


# -----------------------------------------------------------------------------
# the repo

def test_the_export_folders_the_docs_write_are_ignored():
    for path in ("hf-shakespeare/config.json", "hf-shakespeare-char/model.safetensors"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
