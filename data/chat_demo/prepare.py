"""
The instruction-tuning demo's inputs, made here, offline: a tiny base model and a few hundred
conversations that answer in one fixed format.

    python data/chat_demo/prepare.py          # writes out-chat-demo-base/ (see below)
    python data/chat/prepare.py --input=out-chat-demo-base/conversations.jsonl \\
        --tokenizer=out-chat-demo-base --out=data/chat_demo
    python train.py config/chat_demo.py       # ~2 minutes on a CPU
    python chat.py --init_from=out-chat-demo-base --prompt="Tell me about the tiger." --temperature=0
    python chat.py --out_dir=out-chat-demo --prompt="Tell me about the tiger." --temperature=0

out-chat-demo-base/ is a Hugging Face folder, as a hub download would be: a random Qwen2 (64
wide, 2 layers, 4 query / 2 key-value heads, tied embeddings), built by nanogpt/llama.py and
written by hf.export as export_hf.py writes one (config.json, model.safetensors), a byte-level
BPE tokenizer.json trained on the conversations with Qwen's <|endoftext|>, <|im_start|> and
<|im_end|>, and a ChatML chat template in tokenizer_config.json. It needs only
requirements.txt's packages (the `tokenizers` library, not transformers), and transformers
loads it. conversations.jsonl: `conversations` conversations, each a question about a thing
(an animal, a fruit, a city, a colour, an instrument, in several phrasings) and the answer in
the format to learn:

    KIND: animal | NAME: tiger | Tiger is an animal.

Some things (held_out) appear in no conversation, to show that the format, not a list of
answers, is what the tuned model learned. chat_demo.json says how the folder was made; a folder
without it that holds a model or dataset is not written over unless --overwrite=True.

--shape=qwen2.5-0.5b writes the same tokenizer and template with a random model of
Qwen2.5-0.5B's shape instead (896 wide, 24 layers, 14 / 2 heads, SwiGLU 4864, 151,936 tokens,
tied embeddings; 2 GB in float32), its vocabulary filled up to 151,936 with placeholder tokens
<|r0|>, <|r1|>, ... so every id it picks shows: chat.py at that shape, end to end.
"""

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

from configurator import configure, run  # noqa: E402
from bench import shapes  # noqa: E402
from nanogpt.atomic import check_not_foreign, replace_folder  # noqa: E402

# -----------------------------------------------------------------------------
out = "out-chat-demo-base"  # the base model's folder, and its conversations.jsonl
conversations = 600
held_out = "tiger,mango,violin"  # things no conversation is about
seed = 0
shape = "tiny"  # the base model's shape: "tiny" (the demo's), or "qwen2.5-0.5b" (random, 2 GB)
overwrite = False  # write into an --out that holds a model or dataset this script did not make
# -----------------------------------------------------------------------------
# in config.json's terms, as a hub folder gives them
SHAPES = {"tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True),
          "qwen2.5-0.5b": shapes.QWEN2_5_0_5B}

THINGS = {
    "animal": "tiger lion horse rabbit eagle shark wolf camel zebra otter whale frog",
    "fruit": "mango apple pear cherry banana plum peach lemon grape melon",
    "city": "Paris Rome Lagos Lima Oslo Cairo Tokyo Delhi Quito Perth",
    "colour": "red blue green yellow purple orange violet",
    "instrument": "violin piano guitar flute drum cello harp trumpet",
}
QUESTIONS = ["Tell me about the {}.", "What is a {}?", "What do you know about {}?",
             "Describe {}.", "Can you explain what {} is?", "{}?", "I keep hearing about {}. What is it?"]
CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and message.role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# written into out with the rest: how the folder was made, and the sign that this script made it
# (and may write it again)
MADE_BY = "chat_demo.json"


def answer(kind, name):
    article = "an" if kind[0] in "aeiou" else "a"
    return f"KIND: {kind} | NAME: {name} | {name[0].upper() + name[1:]} is {article} {kind}."


def make_conversations(n, rng, skip):
    things = [(kind, name) for kind, names in THINGS.items() for name in names.split() if name not in skip]
    out = []
    for _ in range(n):
        kind, name = rng.choice(things)
        out.append([{"role": "user", "content": rng.choice(QUESTIONS).format(name)},
                    {"role": "assistant", "content": answer(kind, name)}])
    return out


def train_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def main():
    cfg = configure(globals())
    shape, out, seed, held_out = cfg["shape"], cfg["out"], cfg["seed"], cfg["held_out"]
    import torch

    from model import build
    from nanogpt import checkpoint, hf
    from nanogpt.errors import UserError
    from nanogpt.tokenizer import HFTokenizer
    if shape not in SHAPES:
        raise UserError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    check_not_foreign(out, lambda folder: os.path.isfile(os.path.join(folder, MADE_BY)), cfg["overwrite"])
    rng = random.Random(seed)
    chats = make_conversations(cfg["conversations"], rng, set(held_out.split(",")))
    # the vocabulary: the conversations' words, every thing's name (held-out ones too), markup
    names = " ".join(THINGS.values())
    tok = train_tokenizer([m["content"] for c in chats for m in c] + [names, "system user assistant helpful"])
    sizes = {"vocab_size": tok.get_vocab_size(), **SHAPES[shape]}
    if sizes["vocab_size"] > tok.get_vocab_size():  # placeholders, so that any id decodes
        tok.add_tokens([f"<|r{i}|>" for i in range(sizes["vocab_size"] - tok.get_vocab_size())])
    # a reply ends at the end of its turn, or of the text (generate's eos_token_id)
    ends = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    tokenizer = HFTokenizer(tok.to_str(), CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    # the model as a Qwen2 config.json describes it, read as any hub folder's is
    args = hf.model_args({"model_type": "qwen2", **sizes, "eos_token_id": ends}, out, dropout=0.0)
    torch.manual_seed(seed)
    base = build(checkpoint.model_config(args, out))

    def write(folder):
        # the whole folder at once: the export's files, then the demo's own
        hf.export(base, tokenizer, folder)
        with open(os.path.join(folder, MADE_BY), "w", encoding="utf-8") as f:
            json.dump({"made_by": "data/chat_demo/prepare.py", "shape": shape, "seed": seed,
                       "conversations": cfg["conversations"], "held_out": held_out}, f, indent=2)
        with open(os.path.join(folder, "conversations.jsonl"), "w", encoding="utf-8") as f:
            for messages in chats:
                f.write(json.dumps({"messages": messages}) + "\n")

    try:
        replace_folder(out, write)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); nothing there was changed") from None
    print(f"wrote {out}/: a random Qwen2 of {sum(p.numel() for p in base.parameters()):,} "
          f"parameters, a {tok.get_vocab_size()}-token tokenizer with a ChatML template, and "
          f"{len(chats)} conversations (none about {held_out.replace(',', ', ')}), e.g.\n"
          f"  user: {chats[0][0]['content']}\n  assistant: {chats[0][1]['content']}")


if __name__ == "__main__":
    run(main)
