"""Chat templates rendered as transformers' apply_chat_template renders them."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import assert_user_error, run_script, sample_text
from nanogpt.errors import UserError
from nanogpt.tokenizer import HFTokenizer, from_spec

# a ChatML template in the style of Qwen2.5's: a default system prompt, <|im_start|> turns
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "Who wrote Hamlet?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Who wrote Hamlet? "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me of Denmark, «très» vite."}],
]


@pytest.fixture(scope="module")
def tokenizers_pair():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([sample_text()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    ours = HFTokenizer(tok.to_str(), CHATML, special)
    theirs = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHATML, **special)
    return ours, theirs


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_text_and_ids_equal_apply_chat_template(tokenizers_pair, conversation, add_generation_prompt):
    ours, theirs = tokenizers_pair
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(conversation, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    expected = theirs.apply_chat_template(conversation, tokenize=True, return_dict=False,
                                          add_generation_prompt=add_generation_prompt)
    assert ours.encode(text) == list(expected)
    # the template travels with the tokenizer's spec, as checkpoints carry it
    assert from_spec(ours.spec()).apply_chat_template(conversation) == ours.apply_chat_template(conversation)


def test_templates_run_sandboxed_and_errors_are_one_line(tokenizers_pair):
    ours, _ = tokenizers_pair
    evil = HFTokenizer(ours.tok.to_str(), "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception) as info:
        evil.apply_chat_template(CONVERSATIONS[0])
    assert "unsafe" in str(info.value) or "SecurityError" in type(info.value).__name__
    strict = HFTokenizer(ours.tok.to_str(), "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(UserError, match="roles must alternate"):
        strict.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(UserError, match="no chat template"):
        HFTokenizer(ours.tok.to_str()).apply_chat_template(CONVERSATIONS[0])


# -----------------------------------------------------------------------------
# chat.py

@pytest.fixture(scope="module")
def chat_run(tokenizers_pair, tmp_path_factory):
    """A run of ours whose tokenizer carries the chat template: a tiny random GPT."""
    import torch

    from nanogpt import checkpoint
    from model import GPT, GPTConfig
    from nanogpt.optim import configure_optimizers
    ours, _ = tokenizers_pair
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=96, vocab_size=ours.vocab_size))
    out_dir = tmp_path_factory.mktemp("chat-run")
    checkpoint.save_run(str(out_dir / "ckpt.pt"), model, configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu"),
                        {}, ours.spec(), iter_num=0, best_val_loss=9.9)
    return out_dir, model


def test_chat_prompt_keeps_the_history_and_drops_the_oldest_turns(tokenizers_pair, chat_run):
    import chat
    from nanogpt import engine
    ours, theirs = tokenizers_pair
    options = engine.DecodingOptions(8, temperature=0)
    talk = chat.Chat(chat_run[1].eval(), ours, options, engine.stop_token_ids(chat_run[1], ours), system_prompt="Be brief.")
    first, _, _ = talk.reply("Who wrote Hamlet?")
    ids, _, dropped = talk.prompt_ids("And Macbeth?")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"},
                {"role": "assistant", "content": first}, {"role": "user", "content": "And Macbeth?"}]
    assert dropped == 0 and ids == list(theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                    return_dict=False))
    talk.history = talk.history * 6  # six exchanges: more than 96 - 8 tokens
    ids, _, dropped = talk.prompt_ids("And Macbeth?")
    assert dropped > 0 and len(ids) <= 96 - 8 and len(talk.history) == 2 * (6 - dropped)


def test_chat_script_answers_once_and_in_a_repl(chat_run):
    out_dir = chat_run[0]
    once = run_script("chat.py", f"--out_dir={out_dir}", "--prompt=Who wrote Hamlet?", "--device=cpu",
                      "--temperature=0", "--max_new_tokens=8")
    assert once.returncode == 0, once.stderr
    assert once.stdout.strip() and "tokens in" in once.stderr and "tok/s" in once.stderr
    talk = run_script("chat.py", f"--out_dir={out_dir}", "--device=cpu", "--temperature=0", "--max_new_tokens=8",
                      input="Who wrote Hamlet?\n/system Answer in one word.\nAnd Macbeth?\n/exit\n")
    assert talk.returncode == 0, talk.stderr
    assert talk.stdout.count("> ") == 4 and "(a new conversation)" in talk.stderr  # 4 inputs read
    assert talk.stdout.split("> ")[1].strip() == once.stdout.strip()  # greedy: the same first answer


def test_a_hugging_face_folder_brings_its_template_and_chats(tokenizers_pair, tmp_path):
    """A tiny Qwen2 saved by transformers, tokenizer and template included: loaded, its
    template renders as transformers' does, and chat.py answers through it, stopping at
    <|im_end|>."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nanogpt.checkpoint import load_model
    ours, theirs = tokenizers_pair
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=ours.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         eos_token_id=ours.tok.token_to_id("<|im_end|>"))
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    theirs.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path))
    conversation = CONVERSATIONS[2]
    assert tok.apply_chat_template(conversation, add_generation_prompt=True) == \
        theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    result = run_script("chat.py", f"--init_from={tmp_path}", "--device=cpu", "--prompt=Who wrote Hamlet?",
                        "--temperature=0", "--max_new_tokens=12")
    assert result.returncode == 0, result.stderr
    assert "<|im_end|>" not in result.stdout and "tok/s" in result.stderr


# -----------------------------------------------------------------------------
# instruction tuning: data/chat/prepare.py and its loss mask

CHATML_TRACKED = CHATML.replace(
    "{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}",
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message.content | trim + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}"
    "{%- endif %}")


def test_chat_dataset_masks_exactly_the_assistant_tokens(tokenizers_pair, tmp_path):
    """The loss mask equals transformers' assistant mask ({% generation %} in the template),
    and train.py learns only those targets."""
    import json

    import numpy as np
    import torch

    from nanogpt import checkpoint
    from conftest import TINY
    from model import GPT, GPTConfig
    from nanogpt.optim import configure_optimizers
    ours, theirs = tokenizers_pair
    tracked = HFTokenizer(ours.tok.to_str(), CHATML_TRACKED, ours.special_tokens)
    base = tmp_path / "base"
    base.mkdir()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=ours.vocab_size))
    checkpoint.save_run(str(base / "ckpt.pt"), model, configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu"),
                        {}, tracked.spec(), iter_num=0, best_val_loss=9.9)
    conversations = [[{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"ANSWER: {2 * i}."}] + CONVERSATIONS[i % 3]
                     + [{"role": "assistant", "content": "ANSWER: yes."}] for i in range(40)]
    lines = "\n".join(json.dumps({"messages": c}) for c in conversations) + "\n"
    (tmp_path / "chats.jsonl").write_text(lines, encoding="utf-8")
    prepare = run_script("data/chat/prepare.py", f"--input={tmp_path / 'chats.jsonl'}", f"--tokenizer={base}",
                         f"--out={tmp_path / 'data'}")
    assert prepare.returncode == 0, prepare.stderr
    ids = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16).tolist()
    mask = np.fromfile(tmp_path / "data" / "train.mask.bin", dtype=np.uint8).tolist()
    theirs_tracked = PreTrainedTokenizerFast(tokenizer_object=ours.tok, chat_template=CHATML_TRACKED)
    expected_ids, expected_mask = [], []
    for n, conversation in enumerate(conversations):
        if n % 10 == 9:
            continue  # val
        out = theirs_tracked.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
        expected_ids += list(out["input_ids"]) + [ours.eot_token]
        expected_mask += list(out["assistant_masks"]) + [0]
    assert ids == expected_ids and mask == expected_mask
    assert 0 < sum(mask) < len(mask)

    result = run_script("train.py", *TINY, f"--init_from={base}", f"--dataset={tmp_path / 'data'}",
                        f"--out_dir={tmp_path / 'tuned'}", "--block_size=64", "--max_iters=10", "--eval_interval=10")
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines.splitlines()[0] + "\n{\"messages\": 3}\n", encoding="utf-8")
    refused = run_script("data/chat/prepare.py", f"--input={bad}", f"--tokenizer={base}", f"--out={tmp_path / 'bad'}")
    assert_user_error(refused, "line 2")
    assert not (tmp_path / "bad").exists()


def test_get_batch_hides_the_targets_a_mask_leaves_out():
    import numpy as np
    import torch

    from nanogpt.dataset import get_batch
    data = np.arange(100, dtype=np.uint16)
    mask = (np.arange(100) % 3 == 0).astype(np.uint8)
    x, y = get_batch(data, 8, 4, torch.Generator().manual_seed(0), mask=mask)
    assert torch.equal(y[y != -1] % 3, torch.zeros_like(y[y != -1])) and (y == -1).any()
    assert torch.equal(x[:, 1:], torch.where(y[:, :-1] == -1, x[:, 1:], y[:, :-1]))


def test_batches_cut_from_tensors_on_a_device_equal_the_memory_mapped_ones(tmp_path):
    import numpy as np
    import torch

    from nanogpt.dataset import get_batch, to_device
    ids = np.random.default_rng(0).integers(0, 60000, 5000).astype(np.uint16)
    splits = {"train": ids, "train.mask": (ids % 3 == 0).astype(np.uint8)}
    held = to_device(splits, "cpu")
    assert isinstance(held["train"], torch.Tensor) and held["train"].dtype == torch.int32
    for mask in (None, "train.mask"):
        a = get_batch(splits["train"], 16, 6, torch.Generator().manual_seed(1), slice(2, 5), mask and splits[mask])
        b = get_batch(held["train"], 16, 6, torch.Generator().manual_seed(1), slice(2, 5), mask and held[mask])
        assert all(torch.equal(u, v) and v.dtype == torch.int64 for u, v in zip(a, b))
    assert to_device(splits, "cpu", max_tokens=4999) is splits  # too large: left memory-mapped
