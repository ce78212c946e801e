"""
Serving throughput: serve.py's continuous batching with 1, 4 and 16 concurrent clients, and a
transformers generate() loop behind the same HTTP shape, timed in one run on this machine.

$ python bench/serve.py                        # needs transformers (requirements-test.txt)
$ python bench/serve.py --n_requests=32 --max_tokens=128 --device=cuda --compile=True

A GPT-2 124M-shaped model with random weights (gpt2_size: another size's shape), served
in this process by uvicorn on a free port. `requests` completions of prompt_tokens random
token ids each, max_tokens greedy tokens each (no stop token ends one early), streamed, sent by
1, 4 and 16 client threads (concurrency). Reported per run: generated tokens per second over
all clients, and the time to the first token of each request (median and worst). Ratios:
each concurrency against one client at a time (the same requests one after another), and
ours against transformers' generate() (the same weights), which serves one request at a time
(it has no way to add a request to a running generate call).
"""

import concurrent.futures
import json
import os
import queue
import socket
import statistics
import sys
import tempfile
import threading
import time

import requests
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from nanogpt import checkpoint  # noqa: E402
from nanogpt import engine  # noqa: E402
from nanogpt import hardware  # noqa: E402
import serve  # noqa: E402
from bench import shapes  # noqa: E402
from configurator import configure, run  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.quantize import fast_cpu_linears  # noqa: E402

# -----------------------------------------------------------------------------
n_requests = 16  # requests per run
prompt_tokens = 32
max_tokens = 64  # generated per request
concurrency = (1, 4, 16)  # client threads of each run
gpt2_size = "gpt2"
device = "cpu"
compile = False  # serve.py --compile: the batch's one-token steps compiled (CUDA graphs on a GPU)
baseline = True  # also time transformers' generate() behind the same HTTP shape
seed = 0
# -----------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An app served by uvicorn on a thread of this process, while the block runs: its url."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *error):
        self.server.should_exit = True
        self.thread.join()


def transformers_app(model, name):
    """transformers' generate() behind /v1/completions (streamed token ids in, OpenAI's
    chunks out): one request at a time, each generate() call its own."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers.generation.streamers import BaseStreamer

    app, lock = FastAPI(), threading.Lock()

    class Streamer(BaseStreamer):
        def __init__(self):
            self.tokens, self.prompt_seen = queue.Queue(), False

        def put(self, value):
            if self.prompt_seen:  # the first put is the prompt
                self.tokens.put(value)
            self.prompt_seen = True

        def end(self):
            self.tokens.put(None)

    @app.post("/v1/completions")
    def complete(body: dict):
        streamer, n = Streamer(), body["max_tokens"]

        def work():
            with lock, torch.no_grad():
                model.generate(torch.tensor([body["prompt"]], device=model.device), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, streamer=streamer, pad_token_id=0)

        threading.Thread(target=work, daemon=True).start()

        def events():
            while streamer.tokens.get() is not None:
                yield f"data: {json.dumps({'model': name, 'choices': [{'index': 0, 'text': 'x'}]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': n}})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return app


def ask(url, prompt, max_tokens):
    """One streamed completion: (tokens generated, seconds to its first token, seconds)."""
    start, first, tokens = time.perf_counter(), None, 0
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first, time.perf_counter() - start


def measure(url, prompts, clients, max_tokens):
    """(generated tokens per second, median and worst time to first token) of the prompts
    sent by `clients` threads."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: ask(url, p, max_tokens), prompts))
    seconds = time.perf_counter() - start
    firsts = [first for _, first, _ in results]
    return sum(tokens for tokens, _, _ in results) / seconds, statistics.median(firsts), max(firsts)


def models(dev, size, seed):
    """(ours, its tokenizer, transformers') GPT-2-shaped models with the same random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    n_layer, n_head, n_embd = shapes.GPT2[size]
    torch.manual_seed(seed)
    theirs = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                        bos_token_id=None, eos_token_id=None)).eval()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours, tokenizer = checkpoint.load_model(folder, dev, "float32")
    return fast_cpu_linears(ours.eval()), tokenizer, theirs.to(dev)


def main():
    cfg = configure(globals(), nullable=())
    if cfg["gpt2_size"] not in shapes.GPT2:
        raise UserError(f"gpt2_size must be one of {', '.join(shapes.GPT2)}, got {cfg['gpt2_size']!r}")
    dev = hardware.setup(cfg["device"], "float32", training=False)[0]
    ours, tokenizer, theirs = models(dev, cfg["gpt2_size"], cfg["seed"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    new, clients_list = cfg["max_tokens"], cfg["concurrency"]
    prompts = [torch.randint(50257, (cfg["prompt_tokens"],), generator=generator).tolist()
               for _ in range(cfg["n_requests"])]
    print(f"{cfg['gpt2_size']} shape, random weights, float32 on {dev} ({torch.get_num_threads()} "
          f"threads), torch {torch.__version__}; {len(prompts)} requests of {cfg['prompt_tokens']} "
          f"prompt + {new} generated tokens each, streamed over HTTP")
    # every request generates all of its tokens: the stop tokens are held back
    flags = engine.decoding_flags(**{**serve.OPENAI_DEFAULTS, "temperature": 0.0, "min_new_tokens": new})
    server = serve.Server(ours, tokenizer, flags, {"min_new_tokens"}, "bench", 1024, max(clients_list),
                          len(prompts), cfg["compile"])
    results = {}
    with Served(serve.make_app(server)) as url:
        ask(url, prompts[0], new)  # warm: the first request plans kernels and routes
        if cfg["compile"]:  # and each batch size compiles its step once, before any is timed
            for clients in clients_list:
                measure(url, prompts, clients, new)
        for clients in clients_list:
            results[clients] = measure(url, prompts, clients, new)
    server.batcher.close()
    one = results[min(clients_list)][0]
    for clients, (rate, ttft, worst) in results.items():
        print(f"serve.py, {clients:2d} concurrent client(s): {rate:7.1f} tok/s ({rate / one:4.1f}x one "
              f"at a time), first token after {ttft:.2f} s (median), {worst:.2f} s (worst)")
    if cfg["baseline"]:
        with Served(transformers_app(theirs, "bench")) as url:
            ask(url, prompts[0], new)
            rate, ttft, worst = measure(url, prompts, max(clients_list), new)
        ours_rate = results[max(clients_list)][0]
        print(f"transformers generate(), {max(clients_list)} concurrent clients: {rate:7.1f} tok/s, "
              f"first token after {ttft:.2f} s (median), {worst:.2f} s (worst); serve.py "
              f"{ours_rate / rate:.1f}x its throughput")


if __name__ == "__main__":
    run(main)
