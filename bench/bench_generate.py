"""Decoding speed of meshtron (KV cache) against `transformers.generate` on the same weights, and the throughput of
`meshtron serve` at 1, 8 and 32 concurrent clients.

    .venv/bin/python bench/bench_generate.py            # about 5 minutes on 2 cores
    .venv/bin/python bench/bench_generate.py --quick    # fewer repeats and requests

The model is GPT-2-shaped with random weights (6 layers, d=512, 8 heads, vocabulary 50257, context 1024; or
--shape small for gpt2-small's 12 x 768), saved once as a Hugging Face folder that both load. Greedy decoding,
fp32, EOS ignored, the same prompts (random token ids). In one run, the same threads for both: meshtron and
`transformers` alternate, repeat after repeat, and the table shows medians. Time to first token (TTFT) is from
the call to the first new token (prefill included); decode tokens/s counts the tokens after the first, over
the time after the first, summed over the batch. On `model:2` each rank has one thread and `transformers` runs
on rank 0 with both threads while rank 1 waits. The server runs as a real `meshtron serve` process; each client
sends streaming requests back to back (32-token prompts, 64 new tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Usage, others_cores, wait_for_idle  # noqa: E402

CORES = os.cpu_count() or 2
SHAPES = {"6x512": dict(n_layer=6, n_embd=512, n_head=8), "small": dict(n_layer=12, n_embd=768, n_head=12)}
SERVE = ("import sys, argparse; from meshtron.cli import serve as s; p = argparse.ArgumentParser(); "
         "s.add_arguments(p); sys.exit(s.run(p.parse_args(sys.argv[1:])))")


def make_model(path: str, shape: str) -> None:
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=1024, **SHAPES[shape])
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)


def prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (batch, length), generator=g).tolist()


class _Times:
    """A transformers streamer that only records when each generation step's tokens arrive."""

    def __init__(self):
        self.t = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass


def time_hf(model, ids: list[list[int]], new: int):
    x = torch.tensor(ids)
    s = _Times()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, streamer=s)
    t_end = time.perf_counter()
    first = s.t[1]                                  # put #0 is the prompt
    return first - t0, len(ids) * (new - 1) / (t_end - first), out[:, x.shape[1]:].tolist()


def time_meshtron(model, ids: list[list[int]], new: int, **params):
    from meshtron.inference import Engine, Request, SamplingParams
    engine = Engine(model)
    stamps = []
    t0 = time.perf_counter()
    done = engine.generate([Request(b, p, SamplingParams(new, temperature=0, ignore_eos=True, **params))
                            for b, p in enumerate(ids)], max_batch=len(ids),
                           on_event=lambda ev: stamps.append(time.perf_counter()) if not stamps else None)
    t_end = time.perf_counter()
    first = stamps[0]
    return first - t0, len(ids) * (new - 1) / (t_end - first), [c.token_ids for c in done]


def load_hf(path: str):
    import transformers
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    return model


def compare(model_m, model_h, ids, new, repeats, barrier=None, hf_threads=None):
    """Alternating repeats; returns medians, whether the greedy tokens agree, and this rank's CPU usage."""
    rows = {"meshtron": [], "transformers": []}
    same = True
    with Usage() as usage:
        for r in range(repeats + 1):                # repeat 0 warms up both
            tm = time_meshtron(model_m, ids, new)
            if barrier is not None:
                barrier()
            if model_h is not None:                 # on model:2, rank 0 only, with every core
                threads = torch.get_num_threads()
                torch.set_num_threads(hf_threads or threads)
                th = time_hf(model_h, ids, new)
                torch.set_num_threads(threads)
                same = same and th[2] == tm[2]
                if r:
                    rows["transformers"].append(th[:2])
            if barrier is not None:
                barrier()
            if r:
                rows["meshtron"].append(tm[:2])
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in rows.items() if v}
    return med, same, usage.result()


def _tp_worker(path, spec, case, new, repeats):
    import torch.distributed as dist

    from meshtron.interop import build_from_hf
    from meshtron.mesh import Mesh
    mesh = Mesh.from_spec(spec)
    model = build_from_hf(path, mesh).eval()
    hf = load_hf(path) if mesh.rank == 0 else None
    return compare(model, hf, prompts(*case), new, repeats, barrier=dist.barrier, hf_threads=CORES)


QUIET = 0.3          # cores other processes may use during a measurement before it is taken again

LOGPROB_MODES = {"off": {}, "logprobs 5": {"logprobs": 5}, "logprobs 5 + prompt": {"logprobs": 5, "prompt_logprobs": 5}}


def _logprobs_worker(path, spec, case, new, repeats):
    """meshtron's decode with and without logprobs on this mesh, interleaved step by step: one engine per mode on
    the same model, each with the whole batch, stepped in turn, so a change in the machine's load hits all modes
    alike. Returns per mode the medians of (prefill seconds, batch tokens per second of a decoding step)."""
    from meshtron.inference import Engine, Request, SamplingParams
    from meshtron.interop import build_from_hf
    from meshtron.mesh import Mesh
    model = build_from_hf(path, Mesh.from_spec(spec)).eval()
    ids = prompts(*case)
    prefill = {m: [] for m in LOGPROB_MODES}
    steps = {m: [] for m in LOGPROB_MODES}
    modes = list(LOGPROB_MODES)
    with Usage() as usage:
        for r in range(repeats + 1):                # repeat 0 warms up; the order rotates, repeat after repeat
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            engines = {}
            for mode in order:
                engines[mode] = Engine(model)
                reqs = [Request(b, p, SamplingParams(new, temperature=0, ignore_eos=True, **LOGPROB_MODES[mode]))
                        for b, p in enumerate(ids)]
                t0 = time.perf_counter()
                engines[mode].add(reqs)
                if r:
                    prefill[mode].append(time.perf_counter() - t0)
            while any(e.running for e in engines.values()):
                for mode in order:
                    t0 = time.perf_counter()
                    events = engines[mode].step()
                    if r:
                        steps[mode].append(len(events) / (time.perf_counter() - t0))
    med = {m: (statistics.median(prefill[m]), statistics.median(steps[m])) for m in modes}
    return med, usage.result()


def logprobs_table(path, case, new, repeats, wait_idle, meshes=("model:1", "model:2")) -> list[str]:
    """What logprobs cost: decode tok/s with logprobs off, on (top 5), and with the prompt's too, in one run."""
    from meshtron.launch import run_ranks
    lines = ["| mesh | batch x prompt | logprobs | TTFT ms | decode tok/s | decode vs off | other processes (cores) |",
             "|---|---|---|---|---|---|---|"]
    for spec in meshes:
        world = 1 if spec == "model:1" else 2
        wait_for_idle(wait_idle)
        per_rank = run_ranks(_logprobs_worker, world, path, spec, case, new, repeats,
                             threads_per_rank=max(1, CORES // world), timeout_s=3600)
        med, _ = per_rank[0]
        others = others_cores([r[1] for r in per_rank])
        for mode in LOGPROB_MODES:
            ttft, tok_s = med[mode]
            lines.append(f"| `{spec}` | {case[0]} x {case[1]} | {mode} | {ttft * 1e3:.1f} | {tok_s:.1f} | "
                         f"**{tok_s / med['off'][1]:.3f}** | {others:.2f} |")
            print(lines[-1], flush=True)
    return lines


def decode_table(path, cases, new, repeats, wait_idle, attempts=3) -> list[str]:
    """Each case on each mesh; a measurement during which other processes used more than QUIET cores is taken
    again (at most `attempts` times; the quietest is kept)."""
    from meshtron.interop import build_from_hf
    from meshtron.launch import run_ranks
    from meshtron.mesh import Mesh
    torch.set_num_threads(CORES)
    model_m = build_from_hf(path, Mesh.from_spec("model:1")).eval()
    model_h = load_hf(path)

    def one_rank(case):
        med, same, usage = compare(model_m, model_h, prompts(*case), new, repeats)
        return med, same, others_cores([usage])

    def two_ranks(case):
        per_rank = run_ranks(_tp_worker, 2, path, "model:2", case, new, repeats,
                             threads_per_rank=max(1, CORES // 2), timeout_s=3600)
        med, same, _ = per_rank[0]
        return med, same, others_cores([r[2] for r in per_rank])

    results = []
    for spec, threads, measure in (("model:1", CORES, one_rank), ("model:2", max(1, CORES // 2), two_ranks)):
        for case in cases:
            best = None
            for _ in range(attempts):
                wait_for_idle(wait_idle)
                got = measure(case)
                if best is None or got[2] < best[2]:
                    best = got
                if got[2] <= QUIET:
                    break
                print(f"  {spec} {case}: other processes used {got[2]:.2f} cores meanwhile; measuring again",
                      flush=True)
            results.append((spec, threads, best))
        print(f"  {spec} done", flush=True)
    lines = ["| mesh | threads/rank | batch x prompt | meshtron TTFT ms | transformers TTFT ms | meshtron decode tok/s "
             "| transformers decode tok/s | decode speed-up | same greedy tokens | other processes (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (spec, th, (med, same, others)), (b, n) in zip(results, cases * 2):
        (mt, md), (ht, hd) = med["meshtron"], med["transformers"]
        lines.append(f"| `{spec}` | {th} | {b} x {n} | {mt * 1e3:.1f} | {ht * 1e3:.1f} | {md:.1f} | {hd:.1f} | "
                     f"**{md / hd:.2f}x** | {'yes' if same else 'NO'} | {others:.2f} |")
        print(lines[-1], flush=True)
    return lines


# ---- the server ----------------------------------------------------------------------------------------------

def _client(url, bodies, out, lock):
    import httpx
    with httpx.Client(timeout=600) as c:
        while True:
            with lock:
                if not bodies:
                    return
                body = bodies.pop()
            t0 = time.perf_counter()
            first, n = None, 0
            with c.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
                    elif first is None:
                        first = time.perf_counter()
            with lock:
                out.append((time.perf_counter() - t0, first - t0, n))


def load_test(url, clients: int, requests: int, new: int, seed: int):
    bodies = [{"prompt": p, "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}} for p in prompts(requests, 32, seed)]
    out, lock = [], threading.Lock()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=_client, args=(url, bodies, out, lock)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(x[0] for x in out)
    return {"tok_s": sum(x[2] for x in out) / wall, "req_s": len(out) / wall, "p50": statistics.median(lat),
            "p90": lat[min(len(lat) - 1, int(0.9 * len(lat)))], "ttft": statistics.median(x[1] for x in out),
            "tokens": sum(x[2] for x in out), "requests": len(out)}


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by process `pid` and its children (Linux /proc)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")     # utime + stime
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return total


def _measured_load_test(url, server_pid, c, n, new, seed):
    """load_test, and the cores processes other than this benchmark and the server used meanwhile."""
    from common import machine_busy_seconds
    m0, s0, c0, w0 = machine_busy_seconds(), _tree_cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    r = load_test(url, c, n, new, seed)
    wall = time.perf_counter() - w0
    ours = (_tree_cpu_seconds(server_pid) - s0) + (time.process_time() - c0)
    return r, max(0.0, (machine_busy_seconds() - m0 - ours) / wall)


def server_table(path, specs, levels, new, quick, wait_idle, attempts=3) -> list[str]:
    import httpx

    from meshtron.launch import free_port
    lines = ["| mesh | concurrent clients | requests | completion tok/s | requests/s | latency p50 s | latency p90 s "
             "| TTFT p50 ms | mean batch | other processes (cores) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", SERVE, path, "--mesh", spec, "--port", str(port),
                                 "--tokenizer", "gpt2", "--max-batch", "32"], start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            load_test(url, 2, 2, 8, seed=99)                                    # warm up
            for c in levels:
                n = (c * 2 if quick else c * 4) if c > 1 else (4 if quick else 8)
                best = None
                for _ in range(attempts):
                    wait_for_idle(wait_idle)
                    before = httpx.get(url + "/stats").json()
                    r, others = _measured_load_test(url, proc.pid, c, n, new, seed=c)
                    after = httpx.get(url + "/stats").json()
                    if best is None or others < best[1]:
                        best = (r, others, before, after)
                    if others <= QUIET:
                        break
                    print(f"  {spec} x {c} clients: other processes used {others:.2f} cores; measuring again")
                r, busy, before, after = best
                batch = (after["tokens"] - before["tokens"]) / max(1, after["iterations"] - before["iterations"])
                lines.append(f"| `{spec}` | {c} | {r['requests']} | {r['tok_s']:.1f} | {r['req_s']:.2f} | "
                             f"{r['p50']:.2f} | {r['p90']:.2f} | {r['ttft'] * 1e3:.0f} | {batch:.1f} | {busy:.2f} |")
                print(lines[-1], flush=True)
        finally:
            from common import stop_process_group
            stop_process_group(proc)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shape", choices=list(SHAPES), default="6x512")
    ap.add_argument("--part", choices=["all", "decode", "server", "logprobs"], default="all")
    ap.add_argument("--logprobs-meshes", default="model:1,model:2", help="meshes of --part logprobs (default "
                    "model:1,model:2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5; 3 with "
                    "--quick)")
    ap.add_argument("--wait-idle", type=float, default=120, metavar="S",
                    help="before each measurement, wait up to S seconds for other processes to leave the cores "
                         "idle (default 120; 0: do not wait)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "generate.md"))
    args = ap.parse_args()
    q = args.quick
    new, repeats = (64, 3) if q else (128, 5)
    repeats = args.repeats or repeats
    cases = [(1, 128), (8, 128)]
    load0, t_start = os.getloadavg()[0], time.time()
    tmp = tempfile.mkdtemp(prefix="meshtron-bench-gen-")
    sections = []
    try:
        path = os.path.join(tmp, f"gpt2-{args.shape}")
        make_model(path, args.shape)
        if args.part in ("all", "decode"):
            print("decoding: meshtron vs transformers.generate", flush=True)
            lines = decode_table(path, cases, new, repeats, args.wait_idle)
            sections += ["## Decoding: meshtron (KV cache) vs `transformers.generate`", "", *lines, "",
                         f"Greedy, fp32, {new} new tokens, EOS ignored, medians of {repeats} alternating repeats "
                         f"(after one warm-up each). Speed-up = meshtron decode tok/s / transformers decode tok/s "
                         f"(goal >= 1.0x on one rank). On `model:2` transformers runs on rank 0 with {CORES} threads "
                         f"while rank 1 waits. Other processes (cores) = CPU the rest of the machine used during the "
                         f"measurement (other jobs on these {CORES} cores slow both sides and scatter the timings); "
                         f"above {QUIET} the measurement is taken again (at most 3 times, the quietest kept).",
                         ""]
        if args.part in ("all", "logprobs"):
            print("logprobs overhead", flush=True)
            lines = logprobs_table(path, (8, 128), new, repeats, args.wait_idle, args.logprobs_meshes.split(","))
            sections += ["## What logprobs cost", "", *lines, "",
                         f"meshtron alone, greedy, {new} new tokens, batch 8 x 128-token prompts. One engine per mode on "
                         "the same model, stepped in turn (a decoding step of each mode, then the next step of each), "
                         "so the machine's load changes hit every mode alike; decode tok/s = the batch's tokens per "
                         f"step over the median step time, TTFT = the median prefill, over {repeats} repeats after one "
                         "warm-up. `logprobs 5`: each new "
                         "token's logprob and top 5, from the split vocabulary (a few numbers per row and rank "
                         "all-gathered, never the logits); `+ prompt`: the 128 prompt tokens scored too, from the "
                         "prefill pass (TTFT). Goal: decode tok/s with logprobs >= 0.90 of off on `model:2`.", ""]
        if args.part in ("all", "server"):
            print("server throughput", flush=True)
            lines = server_table(path, ["model:1", "model:2"], [1, 8, 32], 64, q, args.wait_idle)
            sections += ["## `meshtron serve` throughput", "", *lines, "",
                         "Closed loop: each client sends streaming `/v1/completions` requests back to back (32-token "
                         "prompts as token ids, `max_tokens` 64, greedy, `ignore_eos`); completion tok/s = all "
                         "completion tokens / wall time; latency = request sent to last chunk; TTFT = to the first "
                         "chunk. `--max-batch 32`; mean batch = tokens per scheduler iteration over the run "
                         "(`GET /stats`): how many sequences were decoded together. A measurement during which "
                         f"other processes used more than {QUIET} cores is taken again (at most 3 times, the "
                         "quietest kept).", ""]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import transformers
    shape = SHAPES[args.shape]
    head = (f"# Generation and serving benchmark\n\nCommand: `.venv/bin/python bench/bench_generate.py"
            f"{' --quick' if q else ''}{'' if args.shape == '6x512' else ' --shape ' + args.shape}"
            f"{'' if args.part == 'all' else ' --part ' + args.part}"
            f"{'' if not args.repeats else ' --repeats ' + str(args.repeats)}"
            f"{'' if args.logprobs_meshes == 'model:1,model:2' else ' --logprobs-meshes ' + args.logprobs_meshes}"
            f"`\n\nModel: GPT-2 shape, {shape['n_layer']} "
            f"layers, d={shape['n_embd']}, {shape['n_head']} heads, vocabulary 50257, random weights. torch "
            f"{torch.__version__}, transformers {transformers.__version__}, {CORES} cores, load average at start "
            f"{load0:.1f}, run took {time.time() - t_start:.0f} s.\n\n")
    text = head + "\n".join(sections)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"\n{text}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
