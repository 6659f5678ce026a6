"""`meshtron serve` as a user runs it: a real server process on model:2 (a random-weight GPT-2 folder with a
word-level tokenizer) on a free 127.0.0.1 port, exercised over HTTP: non-streaming and streaming completions equal
the library's greedy output on one rank, 32 concurrent clients are all answered correctly (batched, with a queue:
--max-batch 8), bad requests get their 4xx in OpenAI's error shape while the server keeps serving, seeded sampling
is reproducible, and SIGTERM stops every rank cleanly. The process group is killed on teardown whatever happens.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from meshtron.launch import free_port

if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("fastapi") is None:
    pytest.skip("transformers and fastapi are needed", allow_module_level=True)
import httpx  # noqa: E402

VOCAB, CTX, KEY = 101, 64, "sk-meshtron-test"
EOS = VOCAB - 1
CHAT_TEMPLATE = ("{% for m in messages %}{{ 'w90' if m['role'] == 'system' else 'w91' }} {{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}w92{% endif %}")
SERVE = ("import sys, argparse; from meshtron.cli import serve as s; p = argparse.ArgumentParser(); "
         "s.add_arguments(p); sys.exit(s.run(p.parse_args(sys.argv[1:])))")


def _model_folder(path: str) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=CTX, bos_token_id=EOS, eos_token_id=EOS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        model.transformer.wte.weight[EOS] = 0             # EOS logit 0: sometimes greedy, mostly not
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "<|endoftext|>": EOS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def _prompt(i: int) -> str:
    return " ".join(f"w{(7 * i + 3 * j) % 90}" for j in range(1 + i % 9))


def _start(path: str, mesh: str, *extra: str):
    """A `meshtron serve` process on `mesh` and a free port, once /health answers: (url, process, log)."""
    port = free_port()
    log = open(os.path.join(path, f"server-{mesh.replace(':', '').replace(',', '-')}.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-c", SERVE, path, "--mesh", mesh, "--port", str(port), *extra],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url, proc, log
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_group(proc)
            log.seek(0)
            pytest.fail(f"the server on {mesh} did not start (exit code {proc.poll()}):\n{log.read()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, process, model folder); the server's process group is killed at the end."""
    path = str(tmp_path_factory.mktemp("served"))
    _model_folder(path)
    url, proc, log = _start(path, "model:2", "--api-key", KEY, "--max-prompt-tokens", "32", "--max-tokens-limit",
                            "40", "--max-body-bytes", "4096", "--max-batch", "8", "--served-model-name", "tiny")
    try:
        yield url, proc, path
    finally:
        _kill_group(proc)
        log.close()


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def expected(server):
    """The library's greedy completion of each test prompt on one rank: what the server must answer."""
    from meshtron.inference import Engine, Request, SamplingParams, model_eos_ids
    from meshtron.load import open_model
    from meshtron.mesh import Mesh
    model, tok, src = open_model(server[2], Mesh.from_spec("model:1"))
    engine = Engine(model, tok, model_eos_ids(src, tok))
    reqs = [Request(i, tok.encode(_prompt(i)), SamplingParams(4 + i % 13, temperature=0)) for i in range(32)]
    return {c.id: c for c in engine.generate(reqs)}


def _post(url, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/v1/completions", content=content, headers=headers, timeout=60, **kw)


def test_completion(server, expected):
    url = server[0]
    r = _post(url, {"model": "tiny", "prompt": _prompt(3), "max_tokens": 4 + 3, "temperature": 0})
    assert r.status_code == 200, r.text
    body, want = r.json(), expected[3]
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": want.text, "logprobs": None, "finish_reason": want.finish_reason}]
    assert body["usage"] == {"prompt_tokens": len(want.prompt_ids), "completion_tokens": len(want.token_ids),
                             "total_tokens": len(want.prompt_ids) + len(want.token_ids)}
    r = _post(url, {"prompt": [_prompt(5), _prompt(18)], "max_tokens": 9, "temperature": 0}).json()  # 4 + i % 13
    assert [(c["index"], c["text"], c["finish_reason"]) for c in r["choices"]] == \
        [(0, expected[5].text, expected[5].finish_reason), (1, expected[18].text, expected[18].finish_reason)]
    assert r["usage"]["completion_tokens"] == len(expected[5].token_ids) + len(expected[18].token_ids)
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"


def test_streaming(server, expected):
    url = server[0]
    want = expected[7]
    pieces, reasons, usage, lines = [], [], None, []
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": _prompt(7), "max_tokens": 4 + 7, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                lines.append(line)
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert len(want.token_ids) == 4 + 7
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        assert chunk["object"] == "text_completion"
        if chunk["choices"]:
            pieces.append(chunk["choices"][0]["text"])
            reasons.append(chunk["choices"][0]["finish_reason"])
        else:
            usage = chunk["usage"]
    assert len(pieces) > 2                                   # it streamed, token by token
    assert "".join(pieces) == want.text and reasons[-1] == want.finish_reason and set(reasons[:-1]) == {None}
    assert usage["completion_tokens"] == len(want.token_ids)


def test_concurrent_clients(server, expected):
    url = server[0]

    def one(i):
        r = _post(url, {"prompt": _prompt(i), "max_tokens": 4 + i % 13, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    before = httpx.get(url + "/stats").json()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    after = httpx.get(url + "/stats").json()
    assert after["sequences"] - before["sequences"] == 32
    assert 4 <= after["max_running"] <= 8                    # batched together, at most --max-batch at once
    for i, got in enumerate(answers):
        assert (got["text"], got["finish_reason"]) == (expected[i].text, expected[i].finish_reason), f"client {i}"


def test_seeded_sampling_is_reproducible(server):
    url = server[0]
    body = {"prompt": _prompt(2), "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 123}
    first = _post(url, body).json()["choices"][0]["text"]
    with ThreadPoolExecutor(4) as pool:                     # alone or batched with others: the same text
        again = list(pool.map(lambda b: _post(url, b).json()["choices"][0]["text"],
                              [body, {**body, "seed": 124}, body, {**body, "prompt": _prompt(9)}]))
    assert again[0] == again[2] == first
    assert again[1] != first


def test_stop_sequences(server, expected):
    url = server[0]
    i = next(i for i in range(32) if len(expected[i].token_ids) >= 6)
    want = expected[i].text
    stop = want.split()[3]
    r = _post(url, {"prompt": _prompt(i), "max_tokens": 4 + i % 13, "temperature": 0, "stop": [stop, "zz"]}).json()
    assert r["choices"][0] == {"index": 0, "text": want[:want.index(" " + stop) + 1], "logprobs": None,
                               "finish_reason": "stop"}


@pytest.mark.parametrize("body,key,status,code", [
    (b'{"prompt": "w1", "max_tokens": ', KEY, 400, "invalid_json"),
    ({"max_tokens": 3}, KEY, 400, "missing_prompt"),
    ({"prompt": " ".join(["w1"] * 33)}, KEY, 400, "context_length_exceeded"),
    ({"prompt": "w1", "max_tokens": 41}, KEY, 400, None),
    ({"prompt": "w1", "temperature": -1}, KEY, 400, None),
    ({"prompt": "w1", "n": 2}, KEY, 400, "unsupported_parameter"),
    ({"prompt": "w1", "model": "gpt-4"}, KEY, 404, "model_not_found"),
    ({"prompt": "w1 " * 2000}, KEY, 413, "request_too_large"),
    ({"prompt": "w1"}, "sk-wrong", 401, "invalid_api_key"),
    ({"prompt": "w1"}, None, 401, "invalid_api_key"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, expected, body, key, status, code):
    url = server[0]
    r = _post(url, body, key=key)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code
    assert httpx.get(url + "/health").status_code == 200
    ok = _post(url, {"prompt": _prompt(1), "max_tokens": 5, "temperature": 0})
    assert ok.json()["choices"][0]["text"] == expected[1].text


def test_replicas_on_a_batch_axis_serve_the_same_answers(server, expected):
    """batch:2: two replicas each decode their own share of the requests (one all-gather of new tokens per
    step keeps them in lockstep); every answer, streamed or not, equals the one-rank greedy completion."""
    url, proc, log = _start(server[2], "batch:2", "--max-batch", "4")
    try:
        def one(i):
            body = {"prompt": _prompt(i), "max_tokens": 4 + i % 13, "temperature": 0}
            if i % 4 == 0:                                   # a quarter of them streamed
                with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=60) as r:
                    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
                return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(32)))
        stats = httpx.get(url + "/stats").json()
        assert stats["sequences"] == 32 and stats["max_running"] > 4      # more than one replica's batch at once
        for i, got in enumerate(answers):
            assert got == (expected[i].text, expected[i].finish_reason), f"client {i}"
    finally:
        _kill_group(proc)
        log.close()


def _chat_expected(path, messages, max_tokens):
    """What the chat endpoint must answer: the one-rank greedy completion of the rendered template."""
    from meshtron.inference import Engine, Request, SamplingParams, model_eos_ids
    from meshtron.load import open_model
    from meshtron.mesh import Mesh
    from meshtron.serve.chat import load_template
    model, tok, src = open_model(path, Mesh.from_spec("model:1"))
    ids = tok.encode(load_template(path).render(messages))
    [done] = Engine(model, tok, model_eos_ids(src, tok)).generate([Request(0, ids, SamplingParams(
        max_tokens, temperature=0))])
    return done, ids


def test_chat_completions(server):
    url, _, path = server
    messages = [{"role": "system", "content": _prompt(1)},
                {"role": "user", "content": [{"type": "text", "text": _prompt(2)}]}]
    want, ids = _chat_expected(path, [messages[0], {"role": "user", "content": _prompt(2)}], 9)
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 9,
                                                       "temperature": 0}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": want.text},
                                "logprobs": None, "finish_reason": want.finish_reason}]
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == len(want.token_ids)

    chunks = []           # streamed: the role first, then the content, then the finish reason
    with httpx.stream("POST", url + "/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 9,
                      "temperature": 0, "stream": True}, headers=headers, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:])
    assert text == want.text and chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason


@pytest.mark.parametrize("body,code", [
    ({"messages": []}, "missing_messages"),
    ({"messages": [{"role": "wizard", "content": "w1"}]}, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, None),
    ({"messages": [{"role": "user", "content": "w1"}], "n": 2}, "unsupported_parameter"),
])
def test_bad_chat_requests_get_400(server, body, code):
    r = httpx.post(server[0] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code


def test_chat_needs_a_template():
    from meshtron.serve.chat import parse_chat
    from meshtron.serve.protocol import APIError, Limits
    with pytest.raises(APIError, match="--chat-template") as e:
        parse_chat({"messages": [{"role": "user", "content": "hi"}]}, None, list, Limits(8, 8, 16, 10))
    assert e.value.status == 400


def test_a_broken_chat_template_fails_before_any_rank_starts(server, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    for template, words in ((str(bad), "not valid Jinja"), (str(tmp_path / "missing.jinja"), "cannot read")):
        r = subprocess.run([sys.executable, "-c", SERVE, server[2], "--chat-template", template, "--port",
                            str(free_port())], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr, r.stderr


def test_sigterm_stops_every_rank(server):   # last: it stops the module's server
    """Last: SIGTERM to the server process (not its group) stops it and its other rank; exit code 0."""
    url, proc, _ = server
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)                          # anyone left in the server's process group?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("a rank outlived the server")
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)
