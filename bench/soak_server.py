"""Soak and fuzz `meshtron serve`, bounded, on loopback only, in one command:

    .venv/bin/python bench/soak_server.py                    # 64 clients for 300 s on model:2, then the fuzz
    .venv/bin/python bench/soak_server.py --duration 30      # shorter, while developing

A real `meshtron serve` process (random-weight GPT-2 folder, word-level tokenizer, chat template) on a free
127.0.0.1 port. Soak: `--clients` threads send requests back to back for `--duration` seconds: greedy completions
(answer checked against the library's one-rank greedy text), streamed ones (joined chunks checked likewise),
streams cancelled after a few chunks, seeded n = 2 samples with logprobs, echoed prompts scored with max_tokens 0,
chat, and bad requests (malformed JSON, lone surrogates, deep nesting, unknown model, unsupported fields, wrong
values) that must get their 4xx. The server's resident memory (all ranks) is sampled throughout. Fuzz: schemathesis
generates bodies from `GET /openapi.json` (valid and invalid) and checks that no response is a 5xx. Passes if every
good request got the right answer in the right shape, every bad one its 4xx, RSS grew less than --max-rss-growth-mb
after warm-up, the fuzz found no 5xx, and /health is 200 at the end. Writes bench/results/soak.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import stop_process_group  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = ("import sys, argparse; from meshtron.cli import serve as s; p = argparse.ArgumentParser(); "
         "s.add_arguments(p); sys.exit(s.run(p.parse_args(sys.argv[1:])))")
VOCAB, CTX = 101, 64
EOS = VOCAB - 1
TEMPLATE = ("{% for m in messages %}{{ 'w90' if m['role'] == 'system' else 'w91' }} {{ m['content'] }} "
            "{% endfor %}{% if add_generation_prompt %}w92{% endif %}")
PROMPTS = 48


def make_model(path: str) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=CTX, bos_token_id=EOS, eos_token_id=EOS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        model.transformer.wte.weight[EOS] = 0
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "<|endoftext|>": EOS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)


def prompt(i: int) -> str:
    return " ".join(f"w{(7 * i + 3 * j) % 90}" for j in range(1 + i % 9))


def expected(path: str) -> dict[int, str]:
    """The library's one-rank greedy text of each prompt (max_tokens 8 + i % 9)."""
    from meshtron.inference import Engine, Request, SamplingParams, model_eos_ids
    from meshtron.load import open_model
    from meshtron.mesh import Mesh
    model, tok, src = open_model(path, Mesh.from_spec("model:1"))
    engine = Engine(model, tok, model_eos_ids(src, tok))
    done = engine.generate([Request(i, tok.encode(prompt(i)), SamplingParams(8 + i % 9, temperature=0))
                            for i in range(PROMPTS)])
    return {c.id: c.text for c in done}


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` and its descendants (Linux /proc), in MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return total / 2 ** 20


BAD = [
    (b'{"prompt": "w1", "max_tokens": ', 400), (b'{"prompt": "w1 \\ud800"}', 400),
    (b'{"prompt": ' + b"[" * 200 + b"]" * 200 + b"}", 400), (b'[1, 2]', 400),
    (json.dumps({"prompt": "w1", "model": "gpt-4"}).encode(), 404),
    (json.dumps({"prompt": "w1", "tools": [{"type": "function"}]}).encode(), 400),
    (json.dumps({"prompt": "w1", "temperature": -1}).encode(), 400),
    (json.dumps({"prompt": "w1", "max_tokens": 10 ** 6}).encode(), 400),
    (json.dumps({"prompt": "w1", "logit_bias": {"x": 1}}).encode(), 400),
    (json.dumps({"prompt": [[1, 2], [VOCAB + 5]]}).encode(), 400),
    (json.dumps({"prompt": "w1 " * 8000}).encode(), 413),           # above --max-body-bytes 16384
]


class Soak:
    def __init__(self, url: str, want: dict[int, str], duration: float, seed: int):
        self.url, self.want, self.deadline = url, want, time.monotonic() + duration
        self.seed = seed
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.latency: list[float] = []
        self.lock = threading.Lock()

    def fail(self, what: str) -> None:
        with self.lock:
            self.counts["failed"] += 1
            if len(self.failures) < 20:
                self.failures.append(what)

    def ok(self, kind: str, t0: float) -> None:
        with self.lock:
            self.counts[kind] += 1
            self.latency.append(time.monotonic() - t0)

    def client(self, c: int) -> None:
        import httpx
        rng = random.Random(self.seed * 1000 + c)
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while time.monotonic() < self.deadline:
                kind = rng.choices(["greedy", "stream", "cancel", "sampled", "echo", "chat", "bad"],
                                   [30, 20, 10, 10, 10, 8, 12])[0]
                t0 = time.monotonic()
                try:
                    getattr(self, kind)(http, rng, t0)
                except Exception as e:  # noqa: BLE001 - every surprise is a failure, reported
                    if kind != "cancel":
                        self.fail(f"{kind}: {type(e).__name__}: {e}")

    def greedy(self, http, rng, t0):
        i = rng.randrange(PROMPTS)
        r = http.post("/v1/completions", json={"prompt": prompt(i), "max_tokens": 8 + i % 9, "temperature": 0})
        body = r.json()
        if r.status_code != 200 or body["object"] != "text_completion" or len(body["choices"]) != 1 \
                or body["choices"][0]["text"] != self.want[i] or body["choices"][0]["finish_reason"] not in \
                ("stop", "length") or body["usage"]["total_tokens"] < 1:
            return self.fail(f"greedy {i}: {r.status_code} {r.text[:200]}")
        self.ok("greedy", t0)

    def stream(self, http, rng, t0):
        i = rng.randrange(PROMPTS)
        text, done, reason = "", False, None
        with http.stream("POST", "/v1/completions", json={"prompt": prompt(i), "max_tokens": 8 + i % 9,
                                                          "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    c = json.loads(line[6:])["choices"][0]
                    text += c["text"]
                    reason = c["finish_reason"] or reason
        if r.status_code != 200 or not done or text != self.want[i] or reason not in ("stop", "length"):
            return self.fail(f"stream {i}: {r.status_code} {text!r} != {self.want[i]!r}")
        self.ok("stream", t0)

    def cancel(self, http, rng, t0):
        with http.stream("POST", "/v1/completions", json={"prompt": prompt(rng.randrange(PROMPTS)), "max_tokens": 40,
                                                          "temperature": 0.8, "stream": True}) as r:
            for k, _ in enumerate(r.iter_lines()):
                if k >= 2:
                    break                                   # the client goes away mid-stream
        with self.lock:
            self.counts["cancelled"] += 1

    def sampled(self, http, rng, t0):
        r = http.post("/v1/completions", json={"prompt": prompt(rng.randrange(PROMPTS)), "max_tokens": 6, "n": 2,
                                               "temperature": 0.9, "seed": rng.randrange(1000), "logprobs": 2})
        body = r.json()
        ok = r.status_code == 200 and sorted(ch["index"] for ch in body["choices"]) == [0, 1] and all(
            len(ch["logprobs"]["tokens"]) == len(ch["logprobs"]["token_logprobs"]) >= 1
            and all(lp <= 0 for lp in ch["logprobs"]["token_logprobs"]) for ch in body["choices"])
        if not ok:
            return self.fail(f"sampled: {r.status_code} {r.text[:200]}")
        self.ok("sampled", t0)

    def echo(self, http, rng, t0):
        ids = [rng.randrange(VOCAB - 2) for _ in range(rng.randrange(2, 12))]
        r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": rng.choice([0, 1]), "echo": True,
                                               "logprobs": 1, "temperature": 0})
        body = r.json()
        lp = body["choices"][0]["logprobs"] if r.status_code == 200 else None
        if lp is None or lp["token_logprobs"][0] is not None or len(lp["tokens"]) < len(ids):
            return self.fail(f"echo: {r.status_code} {r.text[:200]}")
        self.ok("echo", t0)

    def chat(self, http, rng, t0):
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt(
            rng.randrange(PROMPTS))}], "max_tokens": 6, "temperature": 0, "logprobs": False})
        body = r.json()
        if r.status_code != 200 or body["object"] != "chat.completion" or \
                body["choices"][0]["message"]["role"] != "assistant":
            return self.fail(f"chat: {r.status_code} {r.text[:200]}")
        self.ok("chat", t0)

    def bad(self, http, rng, t0):
        raw, status = rng.choice(BAD)
        r = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        if r.status_code != status or set(r.json().get("error", {})) != {"message", "type", "param", "code"}:
            return self.fail(f"bad {raw[:40]!r}: {r.status_code}, expected {status}: {r.text[:200]}")
        with self.lock:
            self.counts["bad (4xx as expected)"] += 1


def fuzz(url: str, examples: int) -> tuple[int, list[str]]:
    """schemathesis over /openapi.json: every operation, `examples` generated requests in each generation mode
    (bodies the schema allows, and bodies it does not); returns (responses, failures): any 5xx fails."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    seen, failures = [0], []
    operations = [("/v1/completions", "POST"), ("/v1/chat/completions", "POST"), ("/v1/models", "GET"),
                  ("/health", "GET"), ("/stats", "GET")]
    for path, method in operations:
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if method == "POST" else (GenerationMode.POSITIVE,)
        for mode in modes:              # a GET without parameters has nothing to make invalid
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=schema[path][method].as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=url, timeout=120)
                seen[0] += 1
                if response.status_code >= 500:
                    failures.append(f"{method} {path} {str(case.body)[:200]} -> {response.status_code} "
                                    f"{response.text[:200]}")
            run()
    return seen[0], failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300, help="seconds of soak (default 300)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--mesh", default="model:2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline (default: a tenth "
                    "of the duration, at most 30)")
    ap.add_argument("--max-rss-growth-mb", type=float, default=64)
    ap.add_argument("--fuzz-examples", type=int, default=200, help="schemathesis examples per operation (0: none)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "soak.md"))
    args = ap.parse_args()
    import httpx

    from meshtron.launch import free_port
    warmup = args.warmup if args.warmup is not None else min(30.0, args.duration / 10)
    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="meshtron-soak-")
    path = os.path.join(tmp, "model")
    make_model(path)
    want = expected(path)
    port = free_port()
    log = open(os.path.join(tmp, "server.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-c", SERVE, path, "--mesh", args.mesh, "--port", str(port),
                             "--max-batch", "32", "--max-prompt-tokens", "32", "--max-tokens-limit", "48",
                             "--max-body-bytes", "16384", "--served-model-name", "tiny"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    result = {}
    try:
        for _ in range(900):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {open(log.name).read()[-3000:]}")
            time.sleep(0.2)
        soak = Soak(url, want, args.duration, args.seed)
        samples: list[tuple[float, float]] = []
        stop_sampling = threading.Event()

        def sample_rss():
            t0 = time.monotonic()
            while not stop_sampling.wait(2.0):
                samples.append((time.monotonic() - t0, rss_mb(proc.pid)))
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=soak.client, args=(c,)) for c in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        stop_sampling.set()
        sampler.join()
        after = [m for t, m in samples if t >= warmup] or [m for _, m in samples]
        base, peak, end = after[0], max(after), after[-1]
        quarters = [after[min(len(after) - 1, len(after) * q // 4)] for q in (1, 2, 3)]
        stats = httpx.get(url + "/stats").json()
        n_fuzz, fuzz_failures = fuzz(url, args.fuzz_examples) if args.fuzz_examples else (0, [])
        health = httpx.get(url + "/health", timeout=10).status_code
        good = sum(soak.counts[k] for k in ("greedy", "stream", "sampled", "echo", "chat"))
        lat = sorted(soak.latency)
        result = dict(good=good, failed=soak.counts["failed"], counts=dict(soak.counts), wall=wall, base=base,
                      peak=peak, end=end, growth=end - base, quarters=quarters, health=health, fuzz=n_fuzz,
                      fuzz_failures=fuzz_failures, stats=stats, failures=soak.failures,
                      p50=lat[len(lat) // 2] if lat else float("nan"),
                      p99=lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"))
    finally:
        stop_process_group(proc)
    r = result
    ok = (r["failed"] == 0 and r["good"] > 0 and r["growth"] < args.max_rss_growth_mb and r["health"] == 200
          and not r["fuzz_failures"])
    counts = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
    lines = ["# `meshtron serve` soak and fuzz", "",
             f"Command: `.venv/bin/python bench/soak_server.py --duration {args.duration:g} --clients {args.clients}"
             f"{'' if args.mesh == 'model:2' else ' --mesh ' + args.mesh}` ({os.cpu_count()} cores; run took "
             f"{time.time() - t_start:.0f} s).", "",
             "| measure | value |", "|---|---|",
             f"| concurrent clients x seconds | {args.clients} x {r['wall']:.0f} |",
             f"| good requests answered right (right shape; greedy text = one-rank library) | {r['good']} of "
             f"{r['good'] + r['failed']} |",
             f"| requests by kind | {counts} |",
             f"| good-request latency p50 / p99 | {r['p50']:.2f} s / {r['p99']:.2f} s |",
             f"| sequences admitted, most decoded together | {r['stats']['sequences']}, {r['stats']['max_running']} |",
             f"| server RSS (all ranks) after {warmup:.0f} s warm-up -> peak -> end | {r['base']:.0f} -> "
             f"{r['peak']:.0f} -> {r['end']:.0f} MiB (growth {r['growth']:+.1f} MiB, bound "
             f"{args.max_rss_growth_mb:g}) |",
             f"| server RSS at 1/4, 1/2, 3/4 of the soak after warm-up | "
             f"{', '.join(f'{q:.0f}' for q in r['quarters'])} MiB |",
             f"| schemathesis fuzz of /openapi.json: responses, 5xx | {r['fuzz']}, {len(r['fuzz_failures'])} |",
             f"| /health at the end | {r['health']} |", "", f"Overall: **{'PASS' if ok else 'FAIL'}**", ""]
    if r["failures"] or r["fuzz_failures"]:
        lines += ["Failures (first 20):", ""] + [f"- `{f}`" for f in r["failures"] + r["fuzz_failures"][:20]] + [""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
