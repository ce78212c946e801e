"""
Chat with a model in the terminal, through its chat template:

$ python chat.py --init_from=Qwen/Qwen2.5-0.5B-Instruct
$ python chat.py --init_from=Qwen/Qwen2.5-0.5B-Instruct --prompt="Who wrote Hamlet?"   # one answer
$ python chat.py --out_dir=out-chat-lora --system="Answer in one word."

Each turn renders the whole conversation with the tokenizer's chat template (as transformers'
apply_chat_template does), generates the assistant's reply, streams it, and keeps it in the
history as generated (as transformers' pipeline does). When the conversation outgrows the
model's context, the oldest turns are dropped (and a note says so); a reply is cut to what the
context leaves (a note says so once). In the REPL: /reset forgets the conversation, /system
<text> sets the system prompt and starts a new conversation, /exit (or Ctrl-D) quits; a message
that cannot be answered (too long, refused by the template, not UTF-8) is a one-line error and
the REPL asks again. --prompt answers once and exits: the reply on stdout, the token count and
tok/s on stderr. A model without a chat template (a base model) continues the text as it is,
with a note. The decoding flags are sample.py's (engine.py's), but those of several rows or
beams.
"""

import sys
import time

from configurator import configure, run  # first: Ctrl-C while the rest loads exits quietly

from nanogpt import checkpoint
from nanogpt import engine
from nanogpt.errors import UserError
from nanogpt.quantize import fast_cpu_linears
from nanogpt.tokenizer import conversation_ids

# -----------------------------------------------------------------------------
init_from = "resume"  # 'resume' loads out_dir/ckpt.pt; or a hub id, a folder, a run's out_dir
out_dir = "out"
prompt = ""  # answer this one message and exit; empty: an interactive chat
system = ""  # the system prompt; empty: the template's default, if it has one
device: str | None = None  # None (or 'auto') picks cuda, then mps, then cpu
dtype: str | None = None  # the weights' dtype; None (or 'auto'): float32 on CPUs, else the GPU's best
# the decoding flags (engine.DecodingOptions' fields and engine.SCRIPT_FLAGS), with sample.py's
# defaults, as a chat's reply is one sample; but a reply is at most 512 tokens (fewer where the
# context leaves less), and the flags of several rows, beams and a whole length are not taken:
# a reply is one streamed sequence after a conversation of its own length
globals().update(engine.decoding_flags(max_new_tokens=512, without=(
    "num_samples", "num_return_sequences", "num_beams", "length_penalty", "early_stopping",
    "max_length", "pad_token_id")))
FLAG_HELP = engine.decoding_flag_help()  # what each of them does, for --help
# -----------------------------------------------------------------------------


class Chat:
    """A conversation with a model: the messages so far, and how to answer the next one."""

    def __init__(self, model, tokenizer, options, stop_tokens, stop_strings=(), system_prompt=""):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.stop_tokens, self.stop_strings, self.system = stop_tokens, stop_strings, system_prompt
        self.history = []  # user and assistant messages, oldest first, the replies as generated
        self.said_capped = False  # whether the user was told that the context caps the replies

    def prompt_ids(self, user):
        """The ids of the conversation with the user's new message and the start of the
        assistant's turn, and how many tokens the reply may take: max_new_tokens, or what the
        context leaves if that is fewer. The oldest turns are dropped while the reply would
        have fewer than max_new_tokens, or than half the context if max_new_tokens is more
        (a model of a small context still answers with its default max_new_tokens).
        Returns (ids, the reply's most tokens, turns dropped)."""
        try:
            user.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that were not UTF-8, read as lone surrogates
            raise UserError(f"the message is not UTF-8 text (character {e.start + 1} is not): "
                            "type it again in UTF-8") from None
        block_size, max_new_tokens = self.model.config.block_size, self.options.max_new_tokens
        if self.tokenizer.chat_template is None:  # a base model continues the text
            return self.tokenizer.encode(user), max_new_tokens, 0
        room = block_size - min(max_new_tokens, block_size // 2)  # for the conversation
        history, dropped = list(self.history), 0
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            messages = system + history + [{"role": "user", "content": user}]
            ids = conversation_ids(self.tokenizer, messages)
            if len(ids) <= room or not history:
                break
            history, dropped = history[2:], dropped + 1  # a user message and its answer
        if len(ids) > room:
            # a lower max_new_tokens keeps less room for the reply, while the message fits at all
            lower = " or lower --max_new_tokens" if len(ids) < block_size else ""
            raise UserError(f"the message takes {len(ids)} tokens with the template, more than the "
                            f"{room} the context ({block_size}) leaves beside the reply "
                            f"(max_new_tokens={max_new_tokens}, at most half the context): shorten "
                            f"it{lower}")
        self.history = history
        return ids, min(max_new_tokens, block_size - len(ids)), dropped

    def reply(self, user, on_text=None):
        """The assistant's answer to the user's message, streamed to on_text(piece) as it comes;
        it joins the history as generated, as transformers' pipeline keeps it (the next turns'
        prompts are then the ids apply_chat_template gives). Returns (reply, tokens generated,
        seconds)."""
        ids, most, dropped = self.prompt_ids(user)
        if dropped:
            print(f"note: the conversation outgrew the context; dropped its {dropped} oldest turn(s)",
                  file=sys.stderr)
        if most < self.options.max_new_tokens and not self.said_capped:
            print(f"note: replies are cut to what the context ({self.model.config.block_size} tokens) "
                  f"leaves after the conversation, fewer than max_new_tokens="
                  f"{self.options.max_new_tokens} ({most} for this one)", file=sys.stderr)
            self.said_capped = True
        stream = engine.TextStream(lambda t: self.tokenizer.decode(t, skip_special_tokens=True), ids,
                                   show_prompt=False)

        def on_token(row, token):
            text = stream.add(token)
            if on_text is not None:
                on_text(text)

        start = time.perf_counter()
        engine.generate(self.model, [ids], stop_tokens=self.stop_tokens, stop_strings=self.stop_strings,
                        tokenizer=self.tokenizer, on_token=on_token,
                        **{**vars(self.options), "max_new_tokens": most})
        seconds = time.perf_counter() - start
        if on_text is not None:
            on_text(stream.flush())
        answer = stream.shown_text()
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer, stream.new_tokens, seconds


def repl(chat):
    # bytes that are not UTF-8 reach the message as lone surrogates (as Python reads them under
    # the C locale), which prompt_ids refuses with a one-line error, not as an exception of input()
    if getattr(sys.stdin, "errors", None) == "strict":
        sys.stdin.reconfigure(errors="surrogateescape")
    print("chat: /reset forgets, /system <text> starts a new conversation with that system "
          "prompt, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        command, _, rest = line.strip().partition(" ")
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            chat.history = []
            print("(a new conversation)", file=sys.stderr)
            continue
        if command == "/system":
            chat.history, chat.system = [], rest.strip()
            which = "set" if chat.system else "the template's default"
            print(f"(a new conversation) the system prompt is {which}; the earlier turns are "
                  "forgotten", file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            chat.reply(line, on_text=lambda text: print(text, end="", flush=True))
        except UserError as e:  # this message only: the conversation goes on
            print(f"error: {e}", file=sys.stderr)
            continue
        print()


def main():
    cfg = configure(globals(), nullable=engine.NULLABLE_FLAGS)
    passed = set(cfg.passed)  # what the user set (a config file or a flag)
    model, tokenizer = checkpoint.load_for_decoding(cfg)
    fast_cpu_linears(model)  # this script owns the model: on a CPU, the layout that decodes fastest
    # a reply is one sequence: no num_samples, and the defaults (the model's generation_config.json
    # for what the user leaves unset, as in sample.py) decide greedy or sampling
    flags, note = engine.with_generation_config(cfg, passed, tokenizer)
    if note:
        print(f"decoding: {note}", file=sys.stderr)
    # the flags chat.py does not take at their defaults: one sequence, no beams
    options = engine.options_from_flags({**engine.decoding_flags(), **flags, "num_samples": 1}, passed,
                                        tokenizer, 0)
    if tokenizer.chat_template is None:
        model_name = cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"]
        print(f"note: {model_name} has no chat template (a base model?): each message is continued "
              "as plain text", file=sys.stderr)
    chat = Chat(model, tokenizer, options, engine.stop_token_ids(model, tokenizer, cfg["eos_token_id"]),
                engine.check_stop_strings(cfg["stop"]), cfg["system"])
    if not cfg["prompt"]:
        return repl(chat)
    answer, tokens, seconds = chat.reply(cfg["prompt"])
    print(answer.strip())
    print(f"{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tok/s", file=sys.stderr)


if __name__ == "__main__":
    run(main)
