"""
Tokenizers, described by a small JSON-able spec so a checkpoint can carry its own:

    {"kind": "char", "chars": "\\n !$&',-.3:;?ABC..."}   # a character vocabulary
    {"kind": "tiktoken", "name": "gpt2"}                  # a tiktoken encoding
    {"kind": "tokenizers", "json": "{...}",               # a Hugging Face tokenizer.json,
     "chat_template": "{% for ... %}", "special_tokens": {"eos_token": "<|im_end|>", ...},
     "ids": {"eot_token": 2, "eos_tokens": [2, 32000], "bos_token": 1}}

and any kind may add "generation": {"temperature": 0.7, "top_p": 0.8, ...}, the decoding
defaults of the model folder's generation_config.json (hf.generation_defaults), which
sample.py and chat.py use where the user sets nothing.

`from_spec(spec)` turns a spec back into an object with encode/decode.
The tokenizer.json, the chat template, the end-of-text and start ids that a Llama-style
folder's config.json / generation_config.json set (hf.llama_special_tokens), and the decoding
defaults are embedded whole, so a model fine-tuned from a hub checkpoint samples, stops and
chats as the hub's does, without the hub.

A chat template (tokenizer_config.json's chat_template, or chat_template.jinja)
is rendered as transformers' apply_chat_template renders it: jinja2's sandbox,
trim_blocks and lstrip_blocks, the same helpers (raise_exception, strftime_now,
a tojson that keeps non-ASCII) and variables (messages, add_generation_prompt,
tools, the special tokens' texts), so the prompt ids are the same.
"""

import functools
import io
import json
import math
import re
import time
import unicodedata
from datetime import datetime

from nanogpt.errors import UserError
from nanogpt.reading import read_text


class CharTokenizer:
    """One token per character, ids in the order of `chars`."""
    chat_template = None
    generation = {}  # generation_config.json's decoding defaults: none

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
    generation = {}  # generation_config.json's decoding defaults (a hub GPT-2's has none)

    def __init__(self, name):
        import requests
        import tiktoken
        self.name = name
        if not isinstance(name, str) or name not in tiktoken.list_encoding_names():
            raise UserError(f"unknown tiktoken encoding {name!r} (tiktoken has "
                            f"{', '.join(tiktoken.list_encoding_names())})")
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
        return with_generation({"kind": "tiktoken", "name": self.name}, self)

    def encode(self, text):
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids, skip_special_tokens=False):
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eot_token]
        return self.enc.decode(ids)


class HFTokenizer:
    """A tokenizer of the `tokenizers` library: a model's tokenizer.json, or a BERT vocab.txt."""

    def __init__(self, json_text, chat_template=None, special_tokens=None, chat_template_file=None):
        from tokenizers import Tokenizer, models, processors
        try:
            self.tok = Tokenizer.from_str(json_text)
        except Exception as e:  # the library raises a bare Exception for a malformed tokenizer.json
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise UserError(f"the tokenizer.json is unreadable ({reason})") from None
        self.vocab_size = self.tok.get_vocab_size()
        self.wordpiece = isinstance(self.tok.model, models.WordPiece)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # {"bos_token": text, ...} for the template
        self.chat_template_file = chat_template_file  # where the template was read from, for its errors
        # a text's end: GPT-2's end-of-text; BERT vocabularies (the Chinese GPT-2s) wrap each text
        # as [CLS] ... [SEP], as their users and transformers' pipeline do; None in vocabularies
        # without either
        self.eot_token = self.tok.token_to_id("[SEP]" if self.wordpiece else "<|endoftext|>")
        self.bos_token = self.tok.token_to_id("[CLS]") if self.wordpiece else None
        if self.wordpiece and self.tok.post_processor is None and None not in (self.bos_token, self.eot_token):
            # transformers' BertTokenizer wraps a text so; its tokenizer.json (an export's) must
            # say it too. encode() leaves them out, as the wrapping is the caller's to choose
            self.tok.post_processor = processors.BertProcessing(("[SEP]", self.eot_token),
                                                                ("[CLS]", self.bos_token))
        # every id that ends a text, where a model's config names several (an instruct model's
        # end of turn and end of text); hf.llama_special_tokens sets them and these two
        self.eos_tokens = []
        self.generation = {}  # generation_config.json's decoding defaults, if the folder had one

    @classmethod
    def from_file(cls, path):
        return cls(read_text(path))

    @classmethod
    def from_bert_vocab(cls, path, lowercase=True):
        """BERT's WordPiece tokenizer from its vocab.txt (one token per line, the id is the line
        number), set up as transformers' BertTokenizer is: the GPT-2-architecture Chinese models
        on the hub (e.g. uer/gpt2-chinese-*) ship only this."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
        # a line ends at \n, \r\n or \r, as a file read as text splits it (str.splitlines would
        # split at other characters too, which a token may be)
        lines = io.StringIO(read_text(path), newline=None)
        vocab = {line.rstrip("\n"): i for i, line in enumerate(lines)}
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
        if self.eos_tokens:  # set from a model's config: kept, since tokenizer.json lacks them
            spec["ids"] = {"eot_token": self.eot_token, "eos_tokens": list(self.eos_tokens),
                           "bos_token": self.bos_token}
        return with_generation(spec, self)

    def apply_chat_template(self, messages, add_generation_prompt=False, tools=None, with_spans=False):
        """The text of a conversation ([{"role": ..., "content": ...}, ...]) as the model's chat
        template writes it; add_generation_prompt: end with the start of an assistant turn;
        with_spans: (text, the character spans of the template's {% generation %} blocks)."""
        if self.chat_template is None:
            raise UserError("this model's tokenizer has no chat template (a base model?): "
                            "give it plain text to continue")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, tools,
                                    self.special_tokens, with_spans, self.chat_template_file)

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


def with_generation(spec, tokenizer):
    """spec, with the tokenizer's generation_config.json decoding defaults if it has any."""
    if tokenizer.generation:
        spec["generation"] = dict(tokenizer.generation)
    return spec


def check_spec(spec):
    """Refuse a tokenizer spec that is not one (a checkpoint's or a dataset's, damaged or of
    another program) with a UserError naming what is wrong."""
    fields = {"char": "chars", "tiktoken": "name", "tokenizers": "json"}
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in fields:
        shown = repr(kind if isinstance(spec, dict) else spec)[:80]
        raise UserError(f"unknown tokenizer {shown}: a tokenizer spec's kind is 'char', "
                        "'tiktoken' or 'tokenizers'")
    value = spec.get(fields[kind])
    if not isinstance(value, str) or not value:
        raise UserError(f"the {kind} tokenizer spec has no {fields[kind]} (a non-empty string), "
                        f"got {repr(value)[:80]}")
    if kind == "char" and len(set(value)) != len(value):
        raise UserError("the char tokenizer spec names a character twice: its ids would clash")
    for key, kind_ in (("chat_template", str), ("special_tokens", dict), ("ids", dict),
                       ("generation", dict)):
        if spec.get(key) is not None and not isinstance(spec[key], kind_):
            raise UserError(f"the tokenizer spec's {key} must be a {kind_.__name__}, got "
                            f"{repr(spec[key])[:80]}")


def check_token_ids(name, ids, vocab_size):
    """Refuse ids that are not tokens of a vocabulary of vocab_size (a negative one would count
    from its end, one past it would be dropped unseen)."""
    for i in ids:
        if not 0 <= i < vocab_size:
            raise UserError(f"{name}: {i} is not a token id: the vocabulary has {vocab_size:,} "
                            f"tokens, 0 ... {vocab_size - 1:,}")


def from_spec(spec):
    check_spec(spec)
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "char":
        tokenizer = CharTokenizer(spec["chars"])
    elif kind == "tiktoken":
        tokenizer = TiktokenTokenizer(spec["name"])
    elif kind == "tokenizers":
        tokenizer = HFTokenizer(spec["json"], spec.get("chat_template"), spec.get("special_tokens"))
        ids = spec.get("ids") or {}
        if ids:  # a Llama-style folder's end and start ids, from its config
            tokenizer.eot_token, tokenizer.bos_token = ids.get("eot_token"), ids.get("bos_token")
            tokenizer.eos_tokens = list(ids.get("eos_tokens") or [])
    else:
        raise UserError(f"unknown tokenizer spec {spec!r}")
    if spec.get("generation"):
        tokenizer.generation = dict(spec["generation"])
    return tokenizer


def _generation_tag(rendered, spans):
    """The {% generation %} ... {% endgeneration %} block that transformers' training templates
    use to mark the text the assistant writes: rendered as its body, whose character span in the
    whole text is appended to spans (rendered: the text's pieces so far, as the template yields
    them), as transformers' return_assistant_tokens_mask finds it."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            text = caller()
            start = sum(map(len, rendered))
            spans.append((start, start + len(text)))
            return text

    return Generation


# A chat template is a program that comes with a model: a render is bounded in time and in the
# text it builds, so that a broken or hostile template ends in one line of error, not in a hang
# or an exhausted memory
RENDER_SECONDS = 5
RENDER_CHARS = 10**7  # characters (or list items): its output and every text it makes on the way
# an integer longer than Python writes as text (sys.int_info.default_max_str_digits) could
# never be printed: * and ** make none
INT_DIGITS = 4300
INT_BITS = math.ceil(INT_DIGITS * math.log2(10))


class RenderBound(Exception):
    """A render ran past RENDER_SECONDS or RENDER_CHARS."""


def bounded_sandbox():
    """jinja2's ImmutableSandboxedEnvironment (which keeps a template from Python's internals and
    from changing its inputs), with bounds on a render's time and text (RENDER_SECONDS,
    RENDER_CHARS) and on its integers (INT_DIGITS). The clock is read wherever a template can go
    on and on: each iteration of a for loop, each output, call (a macro's too), filter and
    operator. The text is counted where a template can make much of it: each output (within a
    macro or a {% set %} block too), each +, *, ~ and %, and what a filter or a method of a text
    or list returns; a number they are given as a width or a count may not ask for more."""
    import jinja2
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    def size(value):
        return len(value) if isinstance(value, (str, list, tuple)) else 0

    class Counted(NodeTransformer):
        """The template's for loops, outputs and ~ (concatenations), routed through the
        environment's each, out and joined (names a template cannot write over)."""

        def helper(self, name, node, args):
            return nodes.Call(nodes.EnvironmentAttribute(name), args, [], None, None).set_lineno(node.lineno)

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = self.helper("each", node, [node.iter])
            return node

        def visit_Output(self, node):
            node = self.generic_visit(node)
            node.nodes = [self.helper("out", child, [child]) for child in node.nodes]
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return self.helper("joined", node, node.nodes)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "**", "%"})

        def __init__(self, filters, globals, **options):
            super().__init__(**options)
            self.deadline, self.built = time.monotonic() + RENDER_SECONDS, 0
            self.filters.update(filters)
            # a filter's first argument is the value it filters; lipsum's is a count
            self.filters = {name: self.bounded(f, 1) for name, f in self.filters.items()}
            self.globals.update(globals, lipsum=self.bounded(self.globals["lipsum"], 0))

        def _parse(self, source, name, filename):  # what parse() and compile() compile
            return Counted().visit(super()._parse(source, name, filename)).set_environment(self)

        def tick(self):
            if time.monotonic() > self.deadline:
                raise RenderBound(f"it ran for more than {RENDER_SECONDS} s, the most a render may")

        def build(self, chars):
            self.built += chars
            if self.built > RENDER_CHARS:
                raise RenderBound(f"it built more than {RENDER_CHARS:,} characters, the most a "
                                  "render may")

        def check_counts(self, values):
            for value in values:
                if isinstance(value, int) and abs(value) > RENDER_CHARS:
                    raise RenderBound(f"it asks for a width or a count of {value}, past the "
                                      f"{RENDER_CHARS:,} characters a render may build")

        def check_format(self, text, values=()):
            """A format string's widths (every number in it, to be safe), and the values its
            * widths take."""
            for run in re.findall(r"\d+", text):
                if len(run) > len(str(RENDER_CHARS)) or int(run) > RENDER_CHARS:
                    raise RenderBound(f"it formats with a width of {run[:20]}"
                                      f"{'...' if len(run) > 20 else ''}, past the "
                                      f"{RENDER_CHARS:,} characters a render may build")
            if "*" in text:
                self.check_counts(values)

        def check_bits(self, bits):
            if bits > INT_BITS:
                raise RenderBound(f"it makes an integer of more than {INT_DIGITS:,} digits, which "
                                  "Python does not write as text")

        def each(self, iterable):
            for item in iterable:
                self.tick()
                yield item

        def out(self, value):
            self.tick()
            self.build(len(str(value)))
            return value

        def joined(self, *parts):
            texts = [str(part) for part in parts]
            self.build(sum(map(len, texts)))
            return "".join(texts)

        def bounded(self, f, counts_from):
            """f, a filter or function, on the clock, its numbers from argument counts_from on
            checked as counts, and what it returns counted."""
            @functools.wraps(f)  # with the marks jinja2 reads of a filter (pass_context, ...)
            def bounded_f(*args, **kwargs):
                self.tick()
                if f is jinja2.filters.do_format:  # its values are printed, not counts
                    self.check_format(str(args[0]), args[1:])
                else:
                    self.check_counts([*args[counts_from:], *kwargs.values()])
                result = f(*args, **kwargs)
                self.build(size(result))
                return result
            return bounded_f

        def call_binop(self, context, operator, left, right):
            self.tick()
            if operator == "*" and isinstance(right, int):
                self.build(size(left) * max(right, 0))
            elif operator == "*" and isinstance(left, int):
                self.build(size(right) * max(left, 0))
            elif operator == "+":
                self.build(size(left) + size(right))
            elif operator == "**" and isinstance(left, int) and isinstance(right, int):
                self.check_bits(right * (abs(left).bit_length() - 1))  # the least the power has
            elif operator == "%" and isinstance(left, str):
                self.check_format(left, right if isinstance(right, tuple) else (right,))
            result = super().call_binop(context, operator, left, right)
            if isinstance(result, int):
                self.check_bits(result.bit_length())
            if operator == "%":
                self.build(size(result))
            return result

        def call(self, context, obj, /, *args, **kwargs):
            self.tick()
            method = getattr(obj, "__wrapped__", obj)  # str.format, which the sandbox wraps
            of_text = isinstance(getattr(method, "__self__", None), (str, list, tuple))
            if of_text and method.__name__ in ("format", "format_map"):
                self.check_format(method.__self__)
            elif of_text:
                self.check_counts([*args, *kwargs.values()])
            result = super().call(context, obj, *args, **kwargs)
            if of_text:
                self.build(size(result))
            return result

    return BoundedSandbox


def chat_template_env(rendered, spans):
    """A bounded sandbox (bounded_sandbox) set up as transformers sets jinja2 up for a chat
    template (see the top of this file); rendered, spans: _generation_tag's."""
    import jinja2

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    return bounded_sandbox()(filters={"tojson": tojson},
                             globals=dict(raise_exception=raise_exception,
                                          strftime_now=lambda fmt: datetime.now().strftime(fmt)),
                             trim_blocks=True, lstrip_blocks=True,
                             extensions=["jinja2.ext.loopcontrols", _generation_tag(rendered, spans)])


@functools.lru_cache(maxsize=16)
def compiled_chat_template(template):
    """A chat template's code, compiled once: each render runs it in an environment of its own
    (chat_template_env), whose filters, helpers and bounds it reads as it runs."""
    return chat_template_env([], []).compile(template)


def render_chat_template(template, messages, add_generation_prompt=False, tools=None,
                         special_tokens=None, with_spans=False, source=None):
    """A chat template rendered as transformers renders it (see the top of this file), bounded
    (bounded_sandbox); with_spans: (text, [(start, end), ...]), the spans of its {% generation %}
    blocks (none if it has none). A message's keys whose value is None are left out, as
    transformers leaves them (OpenAI-style logs write "tool_calls": null, on which templates that
    test `'tool_calls' in message` fail). source: where the template comes from (a file), which
    its errors name."""
    import jinja2
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise UserError("a conversation is a list of {\"role\": ..., \"content\": ...} messages")
    messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
    name = "the chat template" + (f" of {source}" if source else "")
    rendered, spans = [], []
    env = chat_template_env(rendered, spans)
    try:
        code = compiled_chat_template(template)
        for piece in env.template_class.from_code(env, code, env.make_globals(None)).generate(
                messages=messages, tools=tools, documents=None,
                add_generation_prompt=add_generation_prompt, **(special_tokens or {})):
            rendered.append(piece)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"{name} is not a jinja template (line {e.lineno}: {e.message})") from None
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"{name} refused the conversation: {e}") from None
    except RenderBound as e:
        raise UserError(f"{name} was stopped: {e}") from None
    except Exception as e:  # a template is a program: it fails as programs do (TypeError, ...)
        raise UserError(f"{name} failed on the conversation ({type(e).__name__}: {e})") from None
    text = "".join(rendered)
    return (text, spans) if with_spans else text


def conversation_ids(tokenizer, messages):
    """The token ids of a conversation rendered by the tokenizer's chat template, ending with
    the start of the assistant's turn: the prompt of a reply (chat.py and serve.py alike)."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
