"""
Prepare conversations for instruction tuning: each rendered with the model's chat template, and
a loss mask so that only the assistant's tokens are learned.

    python data/chat/prepare.py --input=conversations.jsonl --tokenizer=Qwen/Qwen2.5-0.5B-Instruct --out=data/mychat
    python train.py --init_from=Qwen/Qwen2.5-0.5B-Instruct --dataset=mychat --finetune=lora ...

conversations.jsonl holds one {"messages": [{"role": "user", "content": ...}, ...]} a line.
--tokenizer is the model to tune (a folder, a hub id, a run's out_dir): its tokenizer and chat
template, found as init_from finds the model (no weights are read).

Writes, through the repo's dataset.py, train.bin and val.bin (the conversations' token ids, one
after another, each ended by the end-of-text token where the vocabulary has one), meta.json,
and train.mask.bin / val.mask.bin: one byte per token, 1 where the token is the assistant's
(its turns' text, end-of-turn marker included: see assistant_spans and docs/finetuning.md),
which train.py learns to predict, 0 elsewhere (system prompt, user turns, the template's
markup). Every 10th conversation goes to val. An error names the line of the conversation.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, wherever we run from

from configurator import configure, run  # noqa: E402
from nanogpt.atomic import check_out_dir  # noqa: E402
from nanogpt.dataset import check_dataset_folder, read_text, write_dataset  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.reading import parse_json  # noqa: E402

# -----------------------------------------------------------------------------
input = ""  # the conversations, one JSON object with "messages" a line
out = ""  # the dataset folder to write, e.g. data/mychat (then train with --dataset=mychat)
tokenizer = ""  # the model whose tokenizer and chat template to use
overwrite = False  # write into an --out that holds a model, or a dataset not of this repo's preparers
# -----------------------------------------------------------------------------


def read_conversations(path):
    """[(line number, messages), ...] of a .jsonl file, checked; errors name the line."""
    conversations = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        record = parse_json(line, f"{path}, line {n}")
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise UserError(f'{path}, line {n}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{path}, line {n}: the conversation has no assistant message to learn")
        conversations.append((n, messages))
    if not conversations:
        raise UserError(f"{path} holds no conversation")
    return conversations


def assistant_spans(tok, messages):
    """(text, [(start, end), ...]): the rendered conversation and the character spans the
    assistant writes, found the first of three ways that applies:
    - the template marks them itself with {% generation %} blocks (a training template), read
      as transformers' return_assistant_tokens_mask reads them;
    - each assistant turn is what rendering it adds to the text before it, after the start of
      an assistant turn (add_generation_prompt): what the model writes when it chats;
    - where the template writes earlier turns differently as the conversation grows (Mistral's
      puts the system prompt into the last user turn), the same text found another way: from
      the end of the message before it and the start of an assistant turn, over its content, to
      the end of turn the template writes after it (content_spans)."""
    text, spans = tok.apply_chat_template(messages, with_spans=True)
    if not spans:
        spans = turn_spans(tok, messages, text) or content_spans(tok, messages)
    return text, spans


def turn_spans(tok, messages, text):
    """The assistant turns' spans as what each adds to the text before it; None if the template
    writes a turn differently once later turns follow it."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[:i + 1])
        if not (text.startswith(upto) and upto.startswith(before)):
            return None
        spans.append((len(before), len(upto)))
    return spans


MARK = "\ue000"  # a private-use character, in no real text: where it lands, the content goes


def spans_not_found(i):
    return UserError("this chat template writes earlier turns differently as a conversation grows, "
                     f"and where message {i + 1} is in the text cannot be told")


def content_region(tok, messages, i, add_generation_prompt=False):
    """(text, start, end): messages rendered, and where message i's content is in it: the part
    of the text that changes when the content is replaced by MARK."""
    text = tok.apply_chat_template(messages, add_generation_prompt)
    marked = tok.apply_chat_template(messages[:i] + [dict(messages[i], content=MARK)] + messages[i + 1:],
                                     add_generation_prompt)
    start = len(os.path.commonprefix([text, marked]))
    end = len(os.path.commonprefix([text[start:][::-1], marked[start:][::-1]]))
    if marked[start:len(marked) - end] != MARK:
        raise spans_not_found(i)  # the template writes the content more than once, or not at all
    return text, start, len(text) - end


def content_spans(tok, messages):
    """The assistant turns' spans, each from the end of the message before it, past the text
    that ends that message and starts an assistant turn (as the generation prompt writes it),
    to the end of turn after its content (as a conversation ending there writes it)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        text, start, end = content_region(tok, messages, i)
        upto, _, upto_end = content_region(tok, messages[:i + 1], i)
        end_of_turn = upto[upto_end:]
        if i > 0:
            _, _, turn_start = content_region(tok, messages, i - 1)
            before, _, before_end = content_region(tok, messages[:i], i - 1, add_generation_prompt=True)
            prompt = before[before_end:]
        else:
            turn_start, prompt = 0, tok.apply_chat_template([], add_generation_prompt=True)
        if not (text.startswith(prompt, turn_start) and turn_start + len(prompt) <= start
                and text.startswith(end_of_turn, end)):
            raise spans_not_found(i)
        spans.append((turn_start + len(prompt), end + len(end_of_turn)))
    return spans


def encode_with_mask(tok, messages):
    """(ids, mask) of a conversation: mask[i] is 1 where token i overlaps an assistant span (as
    transformers' return_assistant_tokens_mask marks a token that a span cuts through)."""
    text, spans = assistant_spans(tok, messages)
    encoding = tok.tok.encode(text, add_special_tokens=False)
    mask = [int(any(token_start < span_end and span_start < token_end for span_start, span_end in spans))
            for token_start, token_end in encoding.offsets]
    ids = list(encoding.ids)
    if tok.eot_token is not None and (not ids or ids[-1] != tok.eot_token):
        ids.append(tok.eot_token)  # where one conversation ends and the next begins
        mask.append(0)
    return ids, mask


def main():
    cfg = configure(globals(), nullable=())
    source, out, tokenizer_name = cfg["input"], cfg["out"], cfg["tokenizer"]
    if not source or not out or not tokenizer_name:
        raise UserError("give --input=FILE.jsonl, --tokenizer=MODEL and --out=FOLDER (e.g. data/mychat)")
    check_out_dir(out, "--out")  # a file, a link to nowhere, read-only: before the tokenising
    check_dataset_folder(out, cfg["overwrite"])
    conversations = read_conversations(source)
    from nanogpt.checkpoint import load_tokenizer  # torch is imported only here
    tok = load_tokenizer(tokenizer_name)
    if getattr(tok, "chat_template", None) is None:
        raise UserError(f"{tokenizer_name} has no chat template: instruction tuning needs one "
                        "(a base model's tokenizer may lack it; use the instruct model's)")
    splits = {"train": ([], []), "val": ([], [])}
    for n, (line, messages) in enumerate(conversations):
        try:
            ids, mask = encode_with_mask(tok, messages)
        except UserError as e:
            raise UserError(f"{source}, line {line}: {e}") from None
        split = splits["val" if n % 10 == 9 else "train"]
        split[0].extend(ids)
        split[1].extend(mask)
    if not splits["val"][0]:
        raise UserError(f"{source} has {len(conversations)} conversation(s): val takes every 10th, "
                        "so give at least 10")
    meta = write_dataset(out, tok, splits["train"][0], splits["val"][0], source,
                         masks=(np.array(splits["train"][1], np.uint8), np.array(splits["val"][1], np.uint8)),
                         overwrite=cfg["overwrite"])
    learned = sum(splits["train"][1])
    print(f"{len(conversations)} conversations: train has {meta['train_tokens']:,} tokens "
          f"({learned:,} of them the assistant's, learned), val {meta['val_tokens']:,}")


if __name__ == "__main__":
    run(main)
