"""`meshtron serve` as a user runs it: a real server process on model:2 (a random-weight GPT-2 folder with a
word-level tokenizer) on a free 127.0.0.1 port, exercised over HTTP: non-streaming and streaming completions equal
the library's greedy output on one rank, 32 concurrent clients are all answered correctly (batched, with a queue:
--max-batch 8), bad requests get their 4xx in OpenAI's error shape while the server keeps serving, seeded sampling
is reproducible, and SIGTERM stops every rank cleanly. Logprobs (lm-eval's own loglikelihood request included),
echo, n, best_of, penalties and chat logprobs over HTTP; nothing listens beyond loopback; a rank failure is fatal
on every rank. The process group is killed on teardown whatever happens.
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
    ({"prompt": "w1", "suffix": "w2"}, KEY, 400, "unsupported_parameter"),
    ({"prompt": "w1", "tools": [{"type": "function", "function": {"name": "f"}}]}, KEY, 400, "unsupported_parameter"),
    ({"prompt": "w1", "response_format": {"type": "json_object"}}, KEY, 400, "unsupported_parameter"),
    (b'{"prompt": "w1 \\ud800"}', KEY, 400, "invalid_json"),             # a lone surrogate
    (b'{"prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}", KEY, 400, "invalid_json"),   # nested too deeply
    ({"prompt": "w1", "logit_bias": {"w1": 2}}, KEY, 400, None),
    ({"prompt": "w1", "max_tokens": 0}, KEY, 400, None),                    # 0 only with echo
    ({"prompt": "w1", "n": 2, "best_of": 1}, KEY, 400, None),
    ({"prompt": "w1", "best_of": 3, "stream": True}, KEY, 400, None),
    ({"prompt": "w1", "logprobs": 21}, KEY, 400, None),
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
        # 8 prompts in one request arrive together, whatever the machine's load: both replicas' batches fill
        many = httpx.post(url + "/v1/completions", json={"prompt": [_prompt(i) for i in range(8)], "max_tokens": 4,
                                                         "temperature": 0}, timeout=60)
        assert many.status_code == 200 and len(many.json()["choices"]) == 8, many.text
        stats = httpx.get(url + "/stats").json()
        assert stats["sequences"] == 40 and stats["max_running"] > 4      # more than one replica's batch at once
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
    ({"messages": [{"role": "user", "content": "w1"}], "tools": [{"type": "function"}]}, "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "w1"}], "response_format": {"type": "json_object"}},
     "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "w1"}], "top_logprobs": 2}, None),   # needs logprobs: true
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


def _hf_logprobs(path, ids):
    """transformers' log-softmax over `ids` with the served folder's model: row t scores token t + 1."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def _ids(i: int) -> list[int]:
    return [(5 * i + 7 * j) % 90 for j in range(3 + i % 5)]


def test_lm_eval_loglikelihood_request(server):
    """What lm-eval's local-completions sends for loglikelihood tasks: token-id prompts, echo, logprobs 1,
    max_tokens 1, temperature 0; read back as lm-eval does (token_logprobs[ctxlen:-1], greedy if each equals the
    top). The logprobs equal transformers' to 1e-4, and max_tokens 0 scores the prompt alone."""
    url, _, path = server
    prompts = [_ids(i) for i in range(4)]
    r = _post(url, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 4
    for ids, c in zip(prompts, choices):
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for piece, at in zip(lp["tokens"], lp["text_offset"]):
            assert c["text"][at:at + len(piece)] == piece
        ref = _hf_logprobs(path, ids)
        want = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:-1], want)) < 1e-4
        ctxlen = 1                                                      # lm-eval's parse_logprobs
        tail, tops = lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]
        greedy = all(t == max(top.values()) for t, top in zip(tail, tops))
        assert greedy == all(ids[t] == int(ref[t - 1].argmax()) for t in range(1, len(ids)))
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())   # the greedy new token
        assert abs(lp["token_logprobs"][-1] - ref[-1].max().item()) < 1e-4
    only = _post(url, {"prompt": prompts[2], "echo": True, "logprobs": 3, "max_tokens": 0}).json()["choices"][0]
    assert only["finish_reason"] == "length" and len(only["logprobs"]["tokens"]) == len(prompts[2])
    assert only["logprobs"]["token_logprobs"][1:] == pytest.approx(choices[2]["logprobs"]["token_logprobs"][1:-1],
                                                                   abs=1e-5)          # alone vs padded in a batch
    ref = _hf_logprobs(path, prompts[2])
    for t, top in enumerate(only["logprobs"]["top_logprobs"][1:], start=1):
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(ref[t - 1].topk(3).values.tolist(), abs=1e-4)


def test_completion_logprobs_streamed_equal_non_streamed(server):
    url = server[0]
    body = {"prompt": _prompt(4), "max_tokens": 8, "temperature": 0, "logprobs": 2, "echo": True}
    whole = _post(url, body).json()["choices"][0]
    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[6:])["choices"][0]
                text += c["text"]
                for k in lp:
                    lp[k] += (c["logprobs"] or {}).get(k, [])
    assert text == whole["text"] and lp == whole["logprobs"]


def test_n_and_best_of(server):
    """n seeded samples differ and each is the n = 1 answer with seed + j; best_of returns the likeliest."""
    url = server[0]
    body = {"prompt": _prompt(6), "max_tokens": 10, "temperature": 1.0, "seed": 40}
    r = _post(url, body | {"n": 3}).json()
    texts = [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]
    assert len(set(texts)) == 3 and r["usage"]["completion_tokens"] == sum(
        len(c["text"].split()) for c in r["choices"]) and r["usage"]["prompt_tokens"] == len(_prompt(6).split())
    alone = [_post(url, body | {"seed": 40 + j, "logprobs": 0}).json()["choices"][0] for j in range(3)]
    assert [a["text"] for a in alone] == texts
    means = [sum(a["logprobs"]["token_logprobs"]) / len(a["logprobs"]["token_logprobs"]) for a in alone]
    best = _post(url, body | {"best_of": 3}).json()["choices"]
    assert [c["text"] for c in best] == [texts[max(range(3), key=means.__getitem__)]]


def test_penalties_over_http_equal_the_library(server):
    from meshtron.inference import Engine, Request, SamplingParams, model_eos_ids
    from meshtron.load import open_model
    from meshtron.mesh import Mesh
    url, _, path = server
    model, tok, src = open_model(path, Mesh.from_spec("model:1"))
    ids = tok.encode(_prompt(8))
    params = SamplingParams(12, temperature=0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3,
                            logit_bias={5: 4.0}, min_tokens=12)
    [want] = Engine(model, tok, model_eos_ids(src, tok)).generate([Request(0, ids, params)])
    plain = _post(url, {"prompt": _prompt(8), "max_tokens": 12, "temperature": 0}).json()["choices"][0]["text"]
    r = _post(url, {"prompt": _prompt(8), "max_tokens": 12, "temperature": 0, "repetition_penalty": 1.5,
                    "presence_penalty": 0.5, "frequency_penalty": 0.3, "logit_bias": {"5": 4.0}, "min_tokens": 12})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want.text != plain


def test_chat_logprobs_and_n(server):
    url, _, path = server
    messages = [{"role": "user", "content": _prompt(3)}]
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0,
                                                       "logprobs": False}, headers=headers, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None       # OpenAI's default, accepted
    r = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0,
                                                       "logprobs": True, "top_logprobs": 2, "n": 2},
                   headers=headers, timeout=60).json()
    want, ids = _chat_expected(path, messages, 6)
    ref = _hf_logprobs(path, ids + want.token_ids)
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for c in r["choices"]:                                                  # greedy: both the same
        content = c["logprobs"]["content"]
        assert c["message"]["content"] == want.text and len(content) == len(want.token_ids)
        for j, (entry, tok) in enumerate(zip(content, want.token_ids)):
            assert abs(entry["logprob"] - ref[len(ids) - 1 + j, tok].item()) < 1e-4
            assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["logprob"] == entry["logprob"]
            assert entry["bytes"] == list(entry["token"].encode())


def _listening(pid: int) -> list[str]:
    """Addresses on which the process tree of `pid` listens for TCP connections (from /proc)."""
    pids, todo = set(), [pid]
    while todo:
        p = todo.pop()
        pids.add(p)
        for task in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{task}/children") as f:
                todo += [int(c) for c in f.read().split()]
    inodes = set()
    for p in pids:
        for fd in os.listdir(f"/proc/{p}/fd"):
            try:
                target = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:                   # LISTEN
                    addr = cols[1].split(":")[0]
                    out.append("127.0.0.1" if addr == "0100007F" else
                               "::1" if addr == "0" * 24 + "01000000" else addr)
    return out


def test_nothing_listens_beyond_loopback(server):
    """The ranks' TCPStore (and gloo) are bound to the master address, 127.0.0.1, like the HTTP port."""
    addrs = _listening(server[1].pid)
    assert addrs and set(addrs) <= {"127.0.0.1", "::1"}, addrs


def test_an_empty_api_key_is_refused(server):
    r = subprocess.run([sys.executable, "-c", SERVE, server[2], "--api-key", "", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--api-key is empty" in r.stderr, r.stderr


def test_a_rank_failure_is_fatal_on_every_rank(server):
    """A rank whose engine fails mid-request (injected at its 8th iteration) exits; rank 0 fails the request,
    answers /health 503 (or is gone), and the whole server exits 1 within seconds, not after a collective
    timeout. --log-requests printed the access line of the request before."""
    path = server[2]
    os.environ["MESHTRON_SERVE_FAULT"] = "rank=1:iteration=8"
    try:
        url, proc, log = _start(path, "model:2", "--log-requests")
    finally:
        del os.environ["MESHTRON_SERVE_FAULT"]
    try:
        ok = httpx.post(url + "/v1/completions", json={"prompt": "w1", "max_tokens": 2, "temperature": 0}, timeout=30)
        assert ok.status_code == 200
        t0 = time.monotonic()
        try:
            r = httpx.post(url + "/v1/completions", json={"prompt": "w2", "max_tokens": 30, "temperature": 0},
                           timeout=30)
            assert r.status_code >= 500, r.text
        except httpx.HTTPError:
            pass                                                             # or the connection closed
        try:
            assert httpx.get(url + "/health", timeout=5).status_code == 503
        except httpx.HTTPError:
            pass
        assert proc.wait(30) == 1
        assert time.monotonic() - t0 < 30
        log.seek(0)
        text = log.read()
        assert '"POST /v1/completions HTTP/1.1" 200' in text and "injected fault on rank 1" in text, text
    finally:
        _kill_group(proc)
        log.close()


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


def test_control_messages_are_json_data_and_round_trip():
    """Rank 0's WORK messages to the other ranks are JSON (nothing they read can run code) and decode to equal
    requests: every sampling field, stop strings, integer logit_bias keys, shared-prefill keys, aborts."""
    from meshtron.inference import Request, SamplingParams
    from meshtron.serve.scheduler import decode_work, encode_work
    add = [Request("r-0-0", [5, 1, 9], SamplingParams(7, 0.7, 3, 0.9, 2**62, ("\n\n", "END"), True, 2, 1, 0.5,
                                                     0.25, 1.1, {50256: -100.0, 3: 2.5}, 2), share="r-0"),
           Request("r-1-0", [4], SamplingParams())]
    text = encode_work(add, ["q-0-0"])
    json.loads(text)
    msg = decode_work(text)
    assert msg["add"] == add and msg["abort"] == ["q-0-0"]
    assert msg["add"][0].params.logit_bias == {50256: -100.0, 3: 2.5} and msg["add"][0].params.stop == ("\n\n", "END")
