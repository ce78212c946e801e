"""
Tokenizers, described by a small JSON-able spec so a checkpoint can carry its own:

    {"kind": "char", "chars": "\\n !$&',-.3:;?ABC..."}   # a character vocabulary
    {"kind": "tiktoken", "name": "gpt2"}                  # a tiktoken encoding

`load_tokenizer(spec)` turns a spec back into an object with encode/decode.
"""

from configurator import UserError


class CharTokenizer:
    """One token per character, ids in the order of `chars`."""

    def __init__(self, chars):
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.vocab_size = len(chars)
        self.eot_token = None  # char corpora have no end-of-text token

    @classmethod
    def from_text(cls, text):
        return cls("".join(sorted(set(text))))

    def spec(self):
        return {"kind": "char", "chars": self.chars}

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = " ".join(repr(c) for c in unknown[:10])
            raise UserError(f"text has {len(unknown)} character(s) outside the vocabulary: {shown}"
                            " (use only characters the model was trained on)")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


class TiktokenTokenizer:
    """A byte-pair encoding from tiktoken, e.g. GPT-2's."""

    def __init__(self, name):
        import tiktoken
        self.name = name
        self.enc = tiktoken.get_encoding(name)
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def spec(self):
        return {"kind": "tiktoken", "name": self.name}

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        return self.enc.decode(ids)


def load_tokenizer(spec):
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "tiktoken":
        return TiktokenTokenizer(spec["name"])
    raise UserError(f"unknown tokenizer spec {spec!r}")
