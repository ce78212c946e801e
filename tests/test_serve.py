"""serve.py: OpenAI's API over continuous batching, checked with the official openai client
against a running server, and engine.generate as the oracle of every greedy reply."""

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import REPO, ServedRun, assert_user_error, run_script, sample_text
from test_chat import CHATML, SPECIALS

openai = pytest.importorskip("openai", reason="the openai client is a test dependency "
                                              "(requirements-test.txt)")
pytest.importorskip("fastapi", reason="serve.py needs fastapi and uvicorn (requirements.txt)")

NAME = "tiny-chat"
QUESTIONS = ["Who wrote Hamlet?", "Tell me of Denmark.", "What is a king?", "Speak, O Romeo!",
             "Whence comes the wind?", "Is this a dagger?", "A horse!", "To be, or not?"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A run whose tokenizer carries a ChatML template: a tiny random GPT. (out_dir, model,
    tokenizer)"""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nanogpt import checkpoint
    from model import GPT, GPTConfig
    from nanogpt.optim import configure_optimizers
    from nanogpt.tokenizer import HFTokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([sample_text()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = HFTokenizer(tok.to_str(), CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=1024, vocab_size=tokenizer.vocab_size))
    with torch.no_grad():  # weights wider than the init's: logits far apart, so no two tie within
        for p in model.parameters():  # float rounding and a batch's rounding cannot flip a greedy pick
            if p.dim() == 2:
                p.normal_(0, 0.3)
    out_dir = tmp_path_factory.mktemp("serve-run")
    checkpoint.save_run(str(out_dir / "ckpt.pt"), model, configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu"),
                        {}, tokenizer.spec(), iter_num=0, best_val_loss=9.9)
    return out_dir, model.eval(), tokenizer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(out_dir, *flags, fresh=False):
    """serve.py on a free port (forked from a script server of its own, torch imported: the
    tests' runs go on meanwhile; fresh: in a new interpreter, as a server that compiles needs,
    see conftest.run_script), until the block ends, when SIGTERM stops it as uvicorn is
    stopped: (base url, its pid)."""
    port = free_port()
    args = ["serve.py", f"--out_dir={out_dir}", "--device=cpu", f"--port={port}", f"--model_name={NAME}", *flags]
    if fresh:
        served = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
    else:
        served = ServedRun(args, own_server=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/health", timeout=5).ok:
                    break
            time.sleep(0.1)
        else:
            served.kill()
        yield url, served.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            served.send_signal(signal.SIGTERM)
        _, stderr = served.communicate()
        assert served.returncode in (0, -signal.SIGTERM) and "Traceback" not in stderr, stderr  # uvicorn ends by its signal


@pytest.fixture(scope="module")
def server(chat_model):
    with running_server(chat_model[0], "--max_batch=16", "--max_waiting=8") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def alone(chat_model, prompt_ids, max_tokens, **options):
    """What engine.generate gives the prompt alone: (text, tokens generated, finish reason)."""
    from nanogpt import engine
    _, model, tokenizer = chat_model
    stops = engine.stop_token_ids(model, tokenizer)
    out = engine.generate(model, [prompt_ids], max_tokens, stop_tokens=stops, **options)[0, len(prompt_ids):].tolist()
    ended = next((i for i, t in enumerate(out) if t in stops), None)
    text = tokenizer.decode(out[:ended], skip_special_tokens=True)
    return text, len(out) if ended is None else ended + 1, "length" if ended is None else "stop"


def chat_ids(chat_model, question):
    tokenizer = chat_model[2]
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                          add_generation_prompt=True))


def test_bad_flags_are_one_line_errors(chat_model):
    out_dir = chat_model[0]
    assert_user_error(run_script("serve.py", f"--out_dir={out_dir}", "--max_batch=0"), "max_batch must be >= 1")
    assert_user_error(run_script("serve.py", f"--out_dir={out_dir}", "--device=cpu", "--num_beams=2"),
                      "beam search")
    assert_user_error(run_script("serve.py", f"--out_dir={out_dir}", "--device=cpu", "--top_p=2.0"), "top_p")


def test_greedy_chat_and_completions_equal_engine_generate(chat_model, client):
    ids = chat_ids(chat_model, QUESTIONS[0])
    text, tokens, reason = alone(chat_model, ids, 20, temperature=0)
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           temperature=0, max_tokens=20)
    assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == reason
    # ... and chat.py's answer to the same message
    import chat
    from nanogpt import engine
    _, model, tokenizer = chat_model
    talk = chat.Chat(model, tokenizer, engine.DecodingOptions(20, temperature=0), engine.stop_token_ids(model, tokenizer))
    assert talk.reply(QUESTIONS[0])[0] == text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), tokens)
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                 temperature=0, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == tokens

    prompt = "ROMEO: O, she doth teach"
    ids = chat_model[2].encode(prompt)
    text, tokens, reason = alone(chat_model, ids, 15, temperature=0)
    reply = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=15)
    assert reply.choices[0].text == text and reply.usage.completion_tokens == tokens
    streamed = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=15, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_the_stream_is_openai_server_sent_events_ending_in_done(server):
    body = {"model": NAME, "prompt": "To be", "max_tokens": 4, "temperature": 0, "stream": True}
    lines = [line for line in requests.post(f"{server[0]}/v1/completions", json=body, timeout=30).text.split("\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    first = json.loads(lines[0][len("data: "):])
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")


def test_sampling_with_a_seed_repeats_and_n_gives_n_choices(chat_model, client):
    messages = [{"role": "user", "content": QUESTIONS[1]}]

    def ask(n, seed):
        reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, n=n,
                                               seed=seed, temperature=1.0, extra_body={"top_k": 50, "min_p": 0.01})
        return [c.message.content for c in reply.choices]
    three = ask(3, 5)
    assert len(three) == 3 and len(set(three)) > 1 and three == ask(3, 5)
    assert ask(1, 5) == three[:1]  # choice i draws from seed + i
    assert ask(1, 6) == three[1:2]
    # the seed's sample is engine.generate's with that seed
    expected = alone(chat_model, chat_ids(chat_model, QUESTIONS[1]), 12, temperature=1.0, top_k=50,
                     min_p=0.01, seed=5)[0]
    assert three[0] == expected


def test_compiled_steps_give_the_replies_of_eager_ones(chat_model):
    """--compile: the rows run in buckets of powers of two through generate's compiled step.
    Three choices of one request join together (a bucket of 4, one row idle) and, held to the
    same length, leave together: one shape, one compile. Each seeded choice is what
    engine.generate gives its seed alone, as the eager server's is; the rows differ, so a row
    given another's logits would show."""
    ids = chat_model[2].encode("To be")
    with running_server(chat_model[0], "--compile=True", "--max_batch=4", fresh=True) as (url, _):
        body = {"model": NAME, "prompt": "To be", "max_tokens": 12, "min_tokens": 12, "n": 3,
                "temperature": 0.8, "seed": 7}
        reply = requests.post(f"{url}/v1/completions", json=body, timeout=600).json()
    texts = [choice["text"] for choice in reply["choices"]]
    assert texts == [alone(chat_model, ids, 12, temperature=0.8, min_new_tokens=12, seed=7 + i)[0]
                     for i in range(3)]
    assert len(set(texts)) == 3


def test_stop_strings_end_the_reply_before_them(chat_model, client):
    text = alone(chat_model, chat_ids(chat_model, QUESTIONS[2]), 30, temperature=0)[0]
    stop = text[6:8]
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[2]}],
                                           temperature=0, max_tokens=30, stop=[stop, "never-there"])
    assert reply.choices[0].message.content == text[:text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_logprobs_are_the_models(chat_model, client):
    import torch
    _, model, tokenizer = chat_model
    ids = chat_ids(chat_model, QUESTIONS[3])
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[3]}],
                                           temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0][0, -1], dim=-1)
    best = torch.topk(expected, 3)
    assert content[0].token == tokenizer.decode([int(best.indices[0])])
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy: the most likely
    legacy = client.completions.create(model=NAME, prompt="To be", temperature=0, max_tokens=4, logprobs=2)
    assert "".join(legacy.choices[0].logprobs.tokens) == legacy.choices[0].text
    # the legacy format keys each position's top tokens by their text: two tokens that decode
    # alike (bytes of one character, each shown as U+FFFD) share one key
    tops = legacy.choices[0].logprobs.top_logprobs
    assert all(1 <= len(top) <= 2 for top in tops) and any(len(top) == 2 for top in tops)


def test_sixteen_concurrent_streams_each_get_what_they_get_alone(chat_model, client):
    # different prompts, lengths and settings: greedy rows equal engine.generate alone, seeded
    # sampled rows equal the same request sent alone
    requests_ = [dict(question=QUESTIONS[i % 8] + " " * (i // 8), max_tokens=4 + 5 * i % 24,
                      **({"temperature": 0} if i % 3 else {"temperature": 0.9, "seed": i, "top_p": 0.9,
                                                           "presence_penalty": 0.5}))
                 for i in range(16)]

    def ask(r):
        settings = {k: v for k, v in r.items() if k != "question"}
        stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": r["question"]}],
                                                stream=True, **settings)
        return "".join(c.choices[0].delta.content or "" for c in stream)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, requests_))
    for r, text in zip(requests_, together):
        if r["temperature"] == 0:
            expected = alone(chat_model, chat_ids(chat_model, r["question"]), r["max_tokens"], temperature=0)[0]
        else:
            expected = ask(r)
        assert text == expected, r


def health(url):
    return requests.get(f"{url}/health", timeout=10).json()


def test_a_client_that_disconnects_frees_its_row_at_once(server):
    url = server[0]
    body = {"model": NAME, "prompt": "To be", "max_tokens": 120, "temperature": 0.8, "stream": True,
            "stop": "never-there"}
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=30) as response:
        lines = response.iter_lines()
        next(lines)
        assert health(url)["rows"] == 1
    for _ in range(50):
        if health(url)["rows"] == 0:
            break
        time.sleep(0.05)
    assert health(url) == {"status": "ok", "rows": 0, "waiting": 0}


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url = f"{server[0]}/v1"
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}]}
    cases = [
        (dict(data="{not json"), 400, None),
        (dict(json={**chat, "max_tokens": "5"}), 400, "max_tokens"),
        (dict(json={**chat, "max_tokens": -3}), 400, "max_tokens"),
        (dict(json={**chat, "temperature": "hot"}), 400, "temperature"),
        (dict(json={**chat, "messages": "Hi"}), 400, "messages"),
        (dict(json={**chat, "messages": [{"role": "wizard", "content": "Hi"}]}), 400, "messages"),
        (dict(json={**chat, "top_p": 2.0}), 400, "top_p"),
        (dict(json={**chat, "seed": -1}), 400, "seed"),
        (dict(json={**chat, "n": 2, "temperature": 0}), 400, "n"),
        (dict(json={**chat, "tools": [{"type": "function"}]}), 400, "tools"),
        (dict(json={**chat, "top_logprobs": 2}), 400, "top_logprobs"),
        (dict(json={**chat, "stream_options": {"include_usage": True}}), 400, "stream_options"),
        (dict(json={**chat, "model": "gpt-9"}), 404, "model"),
        (dict(json={**chat, "messages": [{"role": "user", "content": "Hamlet " * 1100}]}), 400, "messages"),
        (dict(json={**chat, "max_tokens": 1020}), 400, "max_tokens"),
    ]
    for kwargs, status, param in cases:
        response = requests.post(f"{url}/chat/completions", timeout=10, **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["message"] and error["type"], error
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=-1)
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    assert client.models.list().data[0].id == NAME


def test_an_unknown_model_is_openais_not_found(client):
    # OpenAI's answer (and vLLM's): 404, and an error naming the model, which the client raises
    # as NotFoundError; GET /v1/models/{id} names the model too
    asks = [lambda name: client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}]),
            lambda name: client.completions.create(model=name, prompt="Hi", max_tokens=2, stream=True),
            lambda name: client.models.retrieve(name)]
    for ask in asks:
        with pytest.raises(openai.NotFoundError) as refused:
            ask("gpt-9")
        error = refused.value
        assert (error.status_code, error.type, error.param, error.code) == \
            (404, "invalid_request_error", "model", "model_not_found")
        assert "gpt-9" in error.message and NAME in error.message
    assert client.models.retrieve(NAME).id == NAME


def test_decoding_values_that_would_overflow_get_a_400_naming_the_field(server):
    """Issue 31: a value that is not a number, or that would divide the logits into infinities,
    is refused before any row is decoded, and the server goes on serving."""
    url = f"{server[0]}/v1/chat/completions"
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases = [("temperature", 1e-300), ("temperature", float("nan")), ("repetition_penalty", 1e-300),
             ("repetition_penalty", float("inf")), ("presence_penalty", 1e308), ("frequency_penalty", -3.0),
             ("top_p", float("nan"))]
    for field, value in cases:  # NaN and Infinity as Python's json writes them, which the server reads
        response = requests.post(url, data=json.dumps({**chat, field: value}), timeout=10,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (field, value, response.text)
        assert response.json()["error"]["param"] == field, (field, value, response.text)
    # values in range that still overflow these logits: the row ends with the step named, and
    # a row decoding beside it goes on to its end
    long = {"model": NAME, "prompt": "To be", "max_tokens": 60, "min_tokens": 60, "stream": True}
    with requests.post(f"{server[0]}/v1/completions", json=long, stream=True, timeout=30) as beside:
        events = (json.loads(line[len(b"data: "):]) for line in beside.iter_lines() if line.startswith(b"data: {"))
        next(events)
        tiny = {**chat, "temperature": 1.2e-38, "repetition_penalty": 1.2e-38}
        response = requests.post(url, json=tiny, timeout=10)
        message = response.json()["error"]["message"]  # names the step that overflows first, for these logits
        assert response.status_code == 500, response.text
        assert any(f"no token can be sampled at new token 1: after {step}" in message
                   for step in ("temperature", "repetition_penalty")), message
        rest = list(events)
        assert [e["choices"][0]["finish_reason"] for e in rest if "choices" in e][-1:] == ["length"], rest[-1]
    assert requests.post(url, json=chat, timeout=10).status_code == 200


def test_a_full_queue_answers_429(server):
    # 40 clients at once, for replies of 1,000 tokens (no stop token before) that none waits
    # for: 16 rows and 8 places in the queue take 24 of them, the others are refused at once
    body = {"model": NAME, "prompt": "To be", "max_tokens": 1000, "min_tokens": 1000, "stream": True}
    all_answered = threading.Barrier(40)

    def post(_):
        with requests.post(f"{server[0]}/v1/completions", json=body, stream=True, timeout=60) as response:
            all_answered.wait(timeout=60)
            return response.status_code
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(post, range(40)))
    assert (statuses.count(200), statuses.count(429)) == (24, 16), statuses
    for _ in range(100):  # the clients have gone: their rows are free
        if health(server[0])["rows"] == 0:
            break
        time.sleep(0.05)
    assert health(server[0]) == {"status": "ok", "rows": 0, "waiting": 0}


def threads_and_memory(pid):
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["Threads"]), int(status["VmRSS"].split()[0]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_a_soak_of_small_requests_grows_neither_threads_nor_memory(server, client):
    def ask(i):
        if i % 2:
            return client.completions.create(model=NAME, prompt=QUESTIONS[i % 8], max_tokens=2)
        return list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[i % 8]}],
                                                   max_tokens=2, stream=True))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(ask, range(40)))  # warm: the pools and caches of every path
        threads, memory = threads_and_memory(server[1])
        list(pool.map(ask, range(200)))
    threads_after, memory_after = threads_and_memory(server[1])
    assert threads_after == threads and memory_after - memory < 10e6, (threads, threads_after, memory, memory_after)


def test_an_api_key_is_required_when_set(chat_model):
    from fastapi.testclient import TestClient

    import serve
    _, model, tokenizer = chat_model
    server = serve.Server(model, tokenizer, serve.engine.decoding_flags(**serve.OPENAI_DEFAULTS), set(), NAME,
                          1024, 2, 2)
    try:
        with TestClient(serve.make_app(server, api_key="sesame")) as http:
            assert http.get("/v1/models").status_code == 401
            assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
            assert http.get("/v1/models", headers={"Authorization": "Bearer sesame"}).json()["data"][0]["id"] == NAME
            assert http.get("/health").status_code == 200 and "<html" in http.get("/").text.lower()
    finally:
        server.batcher.close()

