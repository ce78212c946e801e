"""
Serve a model over HTTP as OpenAI's API does, to many clients at once, with a chat page:

$ python serve.py --init_from=Qwen/Qwen2.5-0.5B-Instruct        # then open http://127.0.0.1:8000
$ python serve.py --out_dir=out-chat-lora --port=8080 --api_key=secret --temperature=0.7

- POST /v1/chat/completions: a conversation, through the model's chat template (chat.py's path);
- POST /v1/completions: plain text (or token ids) to continue;
  both streamed as server-sent events in OpenAI's chunk format when "stream" is true;
- GET /v1/models (and /v1/models/{id}), GET /health, and GET /: the chat page (static/chat.html).

The requests are decoded together by batcher.py (continuous batching): a request joins the
running batch at the next token and leaves it when it ends or its client disconnects. A field
the server cannot honour, a prompt too long for the context, a bad value: status 400 with
OpenAI's error JSON naming the field; a full queue: 429. The decoding flags (engine.py's, as
sample.py and chat.py take them) are the defaults of requests that leave a field out, after the
model's generation_config.json; requests set their own. See docs/serving.md.
"""

import asyncio
import dataclasses
import hmac
import json
import os
import sys
import time
import uuid
from typing import Literal, Optional, Union

from configurator import configure, run  # first: Ctrl-C while the rest loads exits quietly

from nanogpt import checkpoint
from nanogpt import engine
import sample
from nanogpt.batcher import Batcher, Sequence
from nanogpt.errors import UserError
from nanogpt.quantize import fast_cpu_linears
from nanogpt.tokenizer import conversation_ids

# OpenAI's defaults for the decoding flags: one sample, temperature 1, all tokens, unseeded;
# max_new_tokens None: what the context leaves after the prompt
OPENAI_DEFAULTS = dict(num_samples=1, max_new_tokens=None, temperature=1.0, top_k=None, seed=None)

# -----------------------------------------------------------------------------
init_from = "resume"  # 'resume' loads out_dir/ckpt.pt; or a hub id, a folder, a run's out_dir
out_dir = "out"
device: str | None = None  # None (or 'auto') picks cuda, then mps, then cpu
dtype: str | None = None  # the weights' dtype; None (or 'auto'): float32 on CPUs, else the GPU's best
compile = False  # compile the one-token decode step (CUDA graphs on a GPU); each new batch size compiles once
host = "127.0.0.1"  # 0.0.0.0 serves other machines too (then set api_key)
port = 8000
api_key = ""  # non-empty: every /v1 request must carry "Authorization: Bearer <api_key>"
model_name = ""  # the model id clients name and /v1/models lists; empty: init_from (or out_dir)
max_batch = 16  # requests (rows) decoded together
max_waiting = 64  # rows waiting for a place in the batch; a request beyond them gets 429
max_context = 4096  # the longest prompt + reply (at most the model's context); the cache holds max_batch
# the decoding flags (engine.DecodingOptions' fields and engine.SCRIPT_FLAGS) with OpenAI's defaults
# (no pad_token_id: a reply is one row, never padded)
globals().update(engine.decoding_flags(without=("pad_token_id",), **OPENAI_DEFAULTS))
FLAG_HELP = engine.decoding_flag_help()  # what each of them does, for --help
# -----------------------------------------------------------------------------

# the request fields that set a decoding flag: {field: flag}
REQUEST_FLAGS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                 "n": "num_samples", "temperature": "temperature", "top_p": "top_p",
                 "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                 "min_tokens": "min_new_tokens", "seed": "seed", "stop": "stop"}


class ApiError(Exception):
    """A request refused: OpenAI's error JSON with this status, naming the field (param)."""

    def __init__(self, status, message, param=None, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


def request_models():
    """The request bodies, as pydantic models: a value of the wrong type, a field out of
    range or a field the server does not know is refused, never ignored."""
    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class StreamOptions(Strict):
        include_usage: bool = False

    class TextPart(Strict):
        type: Literal["text"]
        text: str

    class Message(Strict):
        role: Literal["system", "developer", "user", "assistant"]
        content: Union[str, list[TextPart]]

    class Sampling(Strict):
        model: str
        max_tokens: Optional[int] = Field(None, ge=1)
        temperature: Optional[float] = None
        top_p: Optional[float] = None
        top_k: Optional[int] = None  # vLLM's extras: top_k, min_p, repetition_penalty, min_tokens
        min_p: Optional[float] = None
        repetition_penalty: Optional[float] = None
        min_tokens: Optional[int] = Field(None, ge=0)
        presence_penalty: Optional[float] = None
        frequency_penalty: Optional[float] = None
        n: int = Field(1, ge=1)
        stop: Union[str, list[str], None] = None
        seed: Optional[int] = None
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        user: Optional[str] = None  # who asked: not used

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: Optional[int] = Field(None, ge=1)
        logprobs: bool = False
        top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    class CompletionRequest(Sampling):
        prompt: Union[str, list[int]]
        logprobs: Optional[int] = Field(None, ge=0, le=20)

    return ChatRequest, CompletionRequest


class Server:
    """The model, its batcher and the settings every request starts from."""

    def __init__(self, model, tokenizer, flags, passed, name, context, max_rows, max_waiting, compile=False):
        self.model, self.tokenizer, self.name, self.context = model, tokenizer, name, context
        self.flags, self.passed = flags, passed  # the decoding flags, and those the user set
        self.stop_tokens = engine.stop_token_ids(model, tokenizer, flags["eos_token_id"])
        self.batcher = Batcher(model, max_rows, max_waiting, context, compile)

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages):
        """The ids of a conversation and the start of the assistant's reply."""
        if self.tokenizer.chat_template is None:
            raise ApiError(400, f"{self.name} has no chat template (a base model?): send plain "
                                "text to /v1/completions", "messages")
        turns = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                  "".join(part.text for part in m.content)} for m in messages]
        try:
            return conversation_ids(self.tokenizer, turns)
        except UserError as e:  # the template's own raise_exception: roles out of order, ...
            raise ApiError(400, str(e), "messages") from None

    def text_prompt(self, prompt):
        """The ids of a completion's prompt (text, as sample.py encodes it, or token ids)."""
        try:
            ids = sample.encode_prompt(self.tokenizer, prompt) if isinstance(prompt, str) else prompt
        except UserError:  # empty, and no end-of-text token to start from
            raise ApiError(400, "the prompt is empty (and this tokenizer has no end-of-text "
                                "token to start from)", "prompt") from None
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        if not all(0 <= i < self.model.config.vocab_size for i in ids):
            raise ApiError(400, f"the prompt holds token ids outside the vocabulary "
                                f"(0 ... {self.model.config.vocab_size - 1})", "prompt")
        return ids

    def options(self, request, prompt_width, prompt_field):
        """The request's DecodingOptions: its fields over the server's flags, checked; a
        prompt that leaves no room in the context, or a reply that would not fit, refused."""
        given = {flag: getattr(request, field) for field, flag in REQUEST_FLAGS.items()
                 if getattr(request, field, None) is not None}
        if given.get("top_k") == -1:  # vLLM's "all tokens"
            given["top_k"] = None
        room = self.context - prompt_width
        if room < 1:
            raise ApiError(400, f"the prompt takes {prompt_width} tokens: the context holds "
                                f"{self.context} with the reply", prompt_field)
        flags = {**self.flags, **given}
        if flags["max_new_tokens"] is None:
            flags["max_new_tokens"] = room
        field = ("max_completion_tokens" if "max_completion_tokens" in request.model_fields_set
                 else "max_tokens")
        if flags["max_new_tokens"] > room:
            raise ApiError(400, f"{field}={flags['max_new_tokens']} does not fit: the context of "
                                f"{self.context} tokens leaves {room} after the "
                                f"{prompt_width}-token prompt", field)
        try:
            return engine.options_from_flags(flags, self.passed | set(given), self.tokenizer, prompt_width)
        except UserError as e:
            raise ApiError(400, str(e), field_named(str(e), field)) from None


def field_named(message, max_tokens_field):
    """The request field an engine error message is about."""
    names = {"max_new_tokens": max_tokens_field, "num_samples": "n", "num_return_sequences": "n"}
    names.update({flag: field for field, flag in REQUEST_FLAGS.items() if flag not in names})
    return next((field for flag, field in names.items() if flag in message), None)


class Reply:
    """The choices of one request as the batcher produces them: every token and end arrives,
    from the batcher's thread, as an event (choice, text, logprobs, end reason) in a queue of
    the request's event loop."""

    def __init__(self, server, prompt, options, stop_strings, logprobs):
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.tokenizer, self.prompt = server.tokenizer, prompt
        seeds = [None if options.seed is None else options.seed + i  # choice 0 is the seed's
                 for i in range(options.num_return_sequences)]
        self.sequences = [Sequence(prompt, dataclasses.replace(options, seed=seed, num_return_sequences=1),
                                   server.stop_tokens, stop_strings, server.decode, self.on_token,
                                   self.on_end, logprobs) for seed in seeds]

    def put(self, event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is stopping
            pass

    def on_token(self, sequence, token, text, logprobs):
        self.put((self.sequences.index(sequence), text, logprobs and (token, *logprobs), None))

    def on_end(self, sequence, reason, text):
        self.put((self.sequences.index(sequence), text, None, reason))

    def cancel(self):
        for sequence in self.sequences:
            sequence.cancel()

    def usage(self):
        """OpenAI's usage: the prompt once, and every token generated (stop tokens included)."""
        completion = sum(len(s.tokens) for s in self.sequences)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": completion,
                "total_tokens": len(self.prompt) + completion}

    def token_text(self, token):
        return self.tokenizer.decode([token])


def chat_logprobs(reply, entries):
    """OpenAI's chat logprobs of some tokens: entries [(token, logprob, [(token, logprob)])]."""
    def item(token, logprob):
        text = reply.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**item(token, logprob), "top_logprobs": [item(*t) for t in top]}
                        for token, logprob, top in entries]}


def completion_logprobs(reply, entries, offset):
    """The legacy completions' logprobs of some tokens, their text starting at offset."""
    tokens = [reply.token_text(token) for token, _, _ in entries]
    offsets = [offset + sum(map(len, tokens[:i])) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [logprob for _, logprob, _ in entries],
            "top_logprobs": [{reply.token_text(t): lp for t, lp in top} for _, _, top in entries],
            "text_offset": offsets}


def make_app(server, api_key=""):
    """The FastAPI application serving `server`."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    ChatRequest, CompletionRequest = request_models()
    app = FastAPI(title="nanoGPT serve", docs_url=None, redoc_url=None)
    page = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "chat.html")

    @app.exception_handler(ApiError)
    async def refused(request, error):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error):
        return JSONResponse(validation_error(error.errors()).body(), status_code=400)

    async def authorized(request: Request):  # async: no worker thread per request
        given = request.headers.get("authorization", "")
        if api_key and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer <key>",
                           code="invalid_api_key")

    @app.get("/")
    async def chat_page():
        return FileResponse(page, media_type="text/html")

    @app.get("/health")
    async def health():
        rows, waiting = server.batcher.load()
        return {"status": "ok", "rows": rows, "waiting": waiting}

    def card():
        return {"id": server.name, "object": "model", "created": 0, "owned_by": "nanogpt",
                "max_model_len": server.context}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorized)])  # a name may hold a "/"
    async def model(name: str):
        check_model(server, name)
        return card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(server, body.model)
        prompt = server.chat_prompt(body.messages)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(server, body, request, prompt, "messages", top, "chat.completion")

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(server, body.model)
        prompt = server.text_prompt(body.prompt)
        return await respond(server, body, request, prompt, "prompt", body.logprobs, "text_completion")

    async def respond(server, body, request, prompt, prompt_field, logprobs, kind):
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is for streamed replies (stream: true)", "stream_options")
        options = server.options(body, len(prompt), prompt_field)
        if body.n > server.batcher.max_waiting + server.batcher.max_rows:
            raise ApiError(400, f"n={body.n} is more choices than the server holds "
                                f"(max_batch + max_waiting)", "n")
        stops = engine.check_stop_strings(server.flags["stop"] if body.stop is None else body.stop)
        reply = Reply(server, prompt, options, stops, logprobs)
        if not server.batcher.submit(reply.sequences):
            raise ApiError(429, "the server is busy: its queue is full; retry in a moment",
                           kind="rate_limit_error")
        meta = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": server.name}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(reply, kind, meta, usage), media_type="text/event-stream")
        return await whole(reply, kind, meta, request)

    return app


def check_model(server, name):
    if name != server.name:
        raise ApiError(404, f"the model {name!r} does not exist: this server serves {server.name!r}",
                       "model", code="model_not_found")


def validation_error(errors):
    """The first of pydantic's complaints about a body, as OpenAI's error."""
    error = errors[0]
    where = [str(part) for part in error["loc"] if part != "body"]
    field = where[0] if where else None
    if error["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({error['ctx'].get('error', '')})")
    if error["type"] == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument supplied: {'.'.join(where)} (this "
                             "server does not honour it)", field)
    return ApiError(400, f"{'.'.join(where) or 'the body'}: {error['msg']}", field)


class ClientGone(Exception):
    """The client of a reply that is not streamed has disconnected."""


async def next_event(reply, request):
    """The reply's next event (request: given for a reply that is not streamed, whose handler
    watches the connection itself; a streamed one is cancelled when its client goes)."""
    while True:
        try:
            return await asyncio.wait_for(reply.events.get(), timeout=None if request is None else 0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone from None


async def whole(reply, kind, meta, request):
    """A reply that is not streamed: every choice's whole text."""
    from fastapi.responses import JSONResponse, Response
    n = len(reply.sequences)
    texts, entries, reasons = [""] * n, [[] for _ in range(n)], [None] * n
    try:
        while None in reasons:
            i, text, logprobs, reason = await next_event(reply, request)
            texts[i] += text
            if logprobs:
                entries[i].append(logprobs)
            reasons[i] = reason
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request": no one reads it
    finally:
        reply.cancel()  # lets the rows go (nothing, if every choice has ended)
    failed = next((r for r in reasons if r.startswith("error")), None)
    if failed:
        return JSONResponse(ApiError(500, failed, kind="server_error").body(), status_code=500)
    choices = []
    for i in range(n):
        if kind == "chat.completion":
            logprobs = chat_logprobs(reply, entries[i])
            choice = {"message": {"role": "assistant", "content": texts[i]}}
        else:
            logprobs = completion_logprobs(reply, entries[i], 0)
            choice = {"text": texts[i]}
        choice["logprobs"] = None if reply.sequences[i].logprobs is None else logprobs
        choices.append({"index": i, **choice, "finish_reason": reasons[i]})
    return {**meta, "object": kind, "choices": choices, "usage": reply.usage()}


async def stream(reply, kind, meta, include_usage):
    """A streamed reply: server-sent events in OpenAI's chunk format, then [DONE]. A client
    that disconnects cancels this generator, which lets its rows go."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if include_usage else {}
    offsets = [0] * len(reply.sequences)

    def event(choices, **more):
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': choices, **extra, **more})}\n\n"

    def choice(i, text, logprobs, reason):
        if chat:
            delta = {"content": text} if text or reason is None else {}
            lp = chat_logprobs(reply, [logprobs]) if logprobs else None
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
        lp = completion_logprobs(reply, [logprobs], offsets[i]) if logprobs else None
        offsets[i] += len(text)
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}

    try:
        if chat:  # the role comes first, as OpenAI sends it
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(reply.sequences))])
        ended = 0
        while ended < len(reply.sequences):
            i, text, logprobs, reason = await next_event(reply, None)
            if reason and reason.startswith("error"):
                yield f"data: {json.dumps(ApiError(500, reason, kind='server_error').body())}\n\n"
                return
            if reason and text:  # the text held back until the end, then the end
                yield event([choice(i, text, None, None)])
                text = ""
            if text or logprobs or reason:
                yield event([choice(i, text, logprobs, reason)])
            ended += reason is not None
        if include_usage:
            yield event([], usage=reply.usage())
        yield "data: [DONE]\n\n"
    finally:
        reply.cancel()


def main():
    cfg = configure(globals(), nullable=engine.NULLABLE_FLAGS)
    passed = set(cfg.passed)
    for name in ("max_batch", "max_waiting", "max_context"):
        if cfg[name] < 1:
            raise UserError(f"{name} must be >= 1, got {cfg[name]}")
    import uvicorn
    model, tokenizer = checkpoint.load_for_decoding(cfg)
    fast_cpu_linears(model)  # this script owns the model: on a CPU, the layout that decodes fastest
    flags, note = engine.with_generation_config(cfg, passed, tokenizer)
    if note:
        print(f"decoding: {note}", file=sys.stderr)
    if flags["num_beams"] > 1:
        raise UserError("serve.py streams sampled or greedy replies: beam search (num_beams > 1) "
                        "is for sample.py")
    engine.options_from_flags({**flags, "max_new_tokens": 1}, passed, tokenizer, 0)  # checked now
    name = cfg["model_name"] or (cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"])
    context = min(cfg["max_context"], model.config.block_size)
    try:
        server = Server(model, tokenizer, flags, passed, name, context, cfg["max_batch"], cfg["max_waiting"],
                        cfg["compile"])
    except (RuntimeError, MemoryError) as e:  # the KV cache of max_batch rows does not fit
        reason = str(e).splitlines()[0][:120]
        raise UserError(f"the KV cache of {cfg['max_batch']} rows of {context} tokens does not fit in "
                        f"memory ({reason}): lower --max_batch or --max_context") from None
    print(f"serving {name} at http://{cfg['host']}:{cfg['port']} (the chat page at /, the API at "
          f"/v1); {cfg['max_batch']} rows of {context} tokens", file=sys.stderr, flush=True)
    try:
        uvicorn.run(make_app(server, cfg["api_key"]), host=cfg["host"], port=cfg["port"],
                    log_level="warning")
    finally:
        server.batcher.close()


if __name__ == "__main__":
    run(main)
