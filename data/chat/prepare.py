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
(the text its turns add to the template's, end-of-turn marker included), which train.py learns
to predict, 0 elsewhere (system prompt, user turns, the template's markup). Every 10th
conversation goes to val.
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, wherever we run from

from configurator import configure, run  # noqa: E402
from dataset import check_dataset_folder, read_text, write_dataset  # noqa: E402
from errors import UserError  # noqa: E402

# -----------------------------------------------------------------------------
input = ""  # the conversations, one JSON object with "messages" a line
out = ""  # the dataset folder to write, e.g. data/mychat (then train with --dataset=mychat)
tokenizer = ""  # the model whose tokenizer and chat template to use
overwrite = False  # write into an --out that holds a model, or a dataset not of this repo's preparers
# -----------------------------------------------------------------------------


def read_conversations(path):
    """The messages of every line of a .jsonl file, checked; errors name the line."""
    conversations = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {n}: not JSON ({e.msg})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise UserError(f'{path}, line {n}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{path}, line {n}: the conversation has no assistant message to learn")
        conversations.append(messages)
    if not conversations:
        raise UserError(f"{path} holds no conversation")
    return conversations


def assistant_spans(tok, messages):
    """(text, [(start, end), ...]): the rendered conversation and the character spans of its
    assistant turns: what rendering turn i adds to the text the template writes before it, up
    to where the assistant starts (add_generation_prompt)."""
    text = tok.apply_chat_template(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[:i + 1])
        if not (text.startswith(upto) and upto.startswith(before)):
            raise UserError("this chat template writes earlier turns differently as a conversation "
                            "grows, so the assistant's tokens cannot be told apart")
        spans.append((len(before), len(upto)))
    return text, spans


def encode_with_mask(tok, messages):
    """(ids, mask) of a conversation: mask[i] is 1 where token i starts inside an assistant turn."""
    text, spans = assistant_spans(tok, messages)
    encoding = tok.tok.encode(text, add_special_tokens=False)
    mask = [int(any(start <= begin < end for start, end in spans)) for begin, _ in encoding.offsets]
    ids = list(encoding.ids)
    if tok.eot_token is not None and (not ids or ids[-1] != tok.eot_token):
        ids.append(tok.eot_token)  # where one conversation ends and the next begins
        mask.append(0)
    return ids, mask


def main():
    configure(globals(), nullable=())
    if not input or not out or not tokenizer:
        raise UserError("give --input=FILE.jsonl, --tokenizer=MODEL and --out=FOLDER (e.g. data/mychat)")
    check_dataset_folder(out, overwrite)
    conversations = read_conversations(input)
    from checkpoint import load_tokenizer  # torch is imported only here
    tok = load_tokenizer(tokenizer)
    if getattr(tok, "chat_template", None) is None:
        raise UserError(f"{tokenizer} has no chat template: instruction tuning needs one "
                        "(a base model's tokenizer may lack it; use the instruct model's)")
    splits = {"train": ([], []), "val": ([], [])}
    for n, messages in enumerate(conversations):
        ids, mask = encode_with_mask(tok, messages)
        split = splits["val" if n % 10 == 9 else "train"]
        split[0].extend(ids)
        split[1].extend(mask)
    if not splits["val"][0]:
        raise UserError(f"{input} has {len(conversations)} conversation(s): val takes every 10th, "
                        "so give at least 10")
    meta = write_dataset(out, tok, splits["train"][0], splits["val"][0], input,
                         masks=(np.array(splits["train"][1], np.uint8), np.array(splits["val"][1], np.uint8)),
                         overwrite=overwrite)
    learned = sum(splits["train"][1])
    print(f"{len(conversations)} conversations: train has {meta['train_tokens']:,} tokens "
          f"({learned:,} of them the assistant's, learned), val {meta['val_tokens']:,}")


if __name__ == "__main__":
    run(main)
