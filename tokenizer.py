"""
Tokenizers, described by a small JSON-able spec so a checkpoint can carry its own:

    {"kind": "char", "chars": "\\n !$&',-.3:;?ABC..."}   # a character vocabulary
    {"kind": "tiktoken", "name": "gpt2"}                  # a tiktoken encoding
    {"kind": "tokenizers", "json": "{...}",               # a Hugging Face tokenizer.json,
     "chat_template": "{% for ... %}", "special_tokens": {"eos_token": "<|im_end|>", ...}}

`from_spec(spec)` turns a spec back into an object with encode/decode.
The tokenizer.json and the chat template are embedded whole, so a model
fine-tuned from a hub checkpoint samples and chats without the hub.

A chat template (tokenizer_config.json's chat_template, or chat_template.jinja)
is rendered as transformers' apply_chat_template renders it: jinja2's sandbox,
trim_blocks and lstrip_blocks, the same helpers (raise_exception, strftime_now,
a tojson that keeps non-ASCII) and variables (messages, add_generation_prompt,
tools, the special tokens' texts), so the prompt ids are the same.
"""

import json
import unicodedata
from datetime import datetime

from errors import UserError


class CharTokenizer:
    """One token per character, ids in the order of `chars`."""
    chat_template = None

    def __init__(self, chars):
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.vocab_size = len(chars)
        self.eot_token = self.bos_token = None  # char corpora have no end-of-text token

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

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.chars[i] for i in ids)  # a char vocabulary has no special tokens


class TiktokenTokenizer:
    """A byte-pair encoding from tiktoken, e.g. GPT-2's."""
    chat_template = None

    def __init__(self, name):
        import requests
        import tiktoken
        self.name = name
        try:
            self.enc = tiktoken.get_encoding(name)
        except (requests.RequestException, OSError) as e:
            # tiktoken downloads an encoding's files on first use, then caches them
            raise UserError(f"cannot get tiktoken's {name!r} encoding ({type(e).__name__}): "
                            "connect to the internet once, or set TIKTOKEN_CACHE_DIR to a folder "
                            "with its files") from None
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token
        self.bos_token = None  # GPT-2's texts start without a token of their own

    def spec(self):
        return {"kind": "tiktoken", "name": self.name}

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids, skip_special_tokens=False):
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eot_token]
        return self.enc.decode(ids)


class HFTokenizer:
    """A tokenizer of the `tokenizers` library: a model's tokenizer.json, or a BERT vocab.txt."""

    def __init__(self, json_text, chat_template=None, special_tokens=None):
        from tokenizers import Tokenizer, models
        try:
            self.tok = Tokenizer.from_str(json_text)
        except Exception as e:  # the library raises a bare Exception for a malformed tokenizer.json
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise UserError(f"the tokenizer.json is unreadable ({reason})") from None
        self.vocab_size = self.tok.get_vocab_size()
        self.wordpiece = isinstance(self.tok.model, models.WordPiece)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # {"bos_token": text, ...} for the template
        # a text's end: GPT-2's end-of-text; BERT vocabularies (the Chinese GPT-2s) wrap each text
        # as [CLS] ... [SEP], as their users and transformers' pipeline do; None in vocabularies
        # without either
        self.eot_token = self.tok.token_to_id("[SEP]" if self.wordpiece else "<|endoftext|>")
        self.bos_token = self.tok.token_to_id("[CLS]") if self.wordpiece else None

    @classmethod
    def from_file(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls(f.read())

    @classmethod
    def from_bert_vocab(cls, path, lowercase=True):
        """BERT's WordPiece tokenizer from its vocab.txt (one token per line, the id is the line
        number), set up as transformers' BertTokenizer is: the GPT-2-architecture Chinese models
        on the hub (e.g. uer/gpt2-chinese-*) ship only this."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
        with open(path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        # BERT's cleanup: lowercase (optional), split off punctuation and every CJK character
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
        return cls(tok.to_str())

    def spec(self):
        spec = {"kind": "tokenizers", "json": self.tok.to_str()}
        if self.chat_template is not None:
            spec.update(chat_template=self.chat_template, special_tokens=self.special_tokens)
        return spec

    def apply_chat_template(self, messages, add_generation_prompt=False, tools=None):
        """The text of a conversation ([{"role": ..., "content": ...}, ...]) as the model's chat
        template writes it; add_generation_prompt: end with the start of an assistant turn."""
        if self.chat_template is None:
            raise UserError("this model's tokenizer has no chat template (a base model?): "
                            "give it plain text to continue")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, tools,
                                    self.special_tokens)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        """The text of ids, special tokens included unless skip_special_tokens (as transformers'
        decode does)."""
        if not self.wordpiece:
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        # WordPiece's own decoder puts a space between all tokens, so Chinese comes out as
        # "这 是 ..."; join the pieces ourselves and put no space next to a wide (CJK) character
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        text = ""
        for piece in (self.tok.id_to_token(i) for i in ids):
            if piece is None or (skip_special_tokens and piece in special):
                continue
            if piece.startswith("##"):
                text += piece[2:]  # the rest of the word begun by the previous piece
            elif text and not (_wide(text[-1]) or _wide(piece[0])):
                text += " " + piece
            else:
                text += piece
        return text


def _wide(ch):
    return unicodedata.east_asian_width(ch) in ("W", "F")


def from_spec(spec):
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "tiktoken":
        return TiktokenTokenizer(spec["name"])
    if kind == "tokenizers":
        return HFTokenizer(spec["json"], spec.get("chat_template"), spec.get("special_tokens"))
    raise UserError(f"unknown tokenizer spec {spec!r}")


def _generation_tag():
    """The {% generation %} ... {% endgeneration %} block that transformers' templates may use to
    mark the assistant's text: rendered as its body (data/chat/prepare.py finds the assistant's
    text by rendering the turns one by one instead)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


def render_chat_template(template, messages, add_generation_prompt=False, tools=None,
                         special_tokens=None):
    """A chat template rendered as transformers renders it (see the top of this file)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    GenerationTag = _generation_tag()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", GenerationTag])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise UserError("a conversation is a list of {\"role\": ..., \"content\": ...} messages")
    try:
        return env.from_string(template).render(
            messages=messages, tools=tools, documents=None,
            add_generation_prompt=add_generation_prompt, **(special_tokens or {}))
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"the chat template refused the conversation: {e}") from None
