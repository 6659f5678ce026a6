"""EleutherAI's lm-evaluation-harness end to end against `meshtron serve`, offline, in one command:

    .venv/bin/python bench/lm_eval_serve.py          # installs the 'eval' extra (lm-eval) first if it is missing

A random-weight GPT-2 folder with a byte-level BPE tokenizer (trained here on CPython's documentation), two tasks
defined on local JSON Lines files written here (a multiple-choice loglikelihood task and a `generate_until`
task; custom task YAML, no hub), `lm_eval --model local-completions` against a real `meshtron serve` on
`model:2`. Checked: every per-item loglikelihood lm-eval logs equals `meshtron eval --loglikelihood`'s and
transformers' to 1e-4, the greedy flags agree, and every `generate_until` output equals `meshtron generate`'s
greedy text. Writes bench/results/lm_eval.md; exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = ("import sys, argparse; from meshtron.cli import serve as s; p = argparse.ArgumentParser(); "
         "s.add_arguments(p); sys.exit(s.run(p.parse_args(sys.argv[1:])))")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": "", "TOKENIZERS_PARALLELISM": "false"}
CTX, NEW = 128, 12


def ensure_lm_eval() -> None:
    if any(importlib.util.find_spec(m) is None for m in ("lm_eval", "tenacity")):   # lm-eval[api]
        print("installing the 'eval' extra (lm-eval[api]) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", os.path.join(ROOT, "constraints.txt"),
                        "-e", f"{ROOT}[eval]"], check=True)


def make_model(path: str) -> None:
    """GPT-2 shape, random weights (std 0.2: logits O(1), no near-ties), a byte-level BPE of 1000 tokens."""
    import torch
    import transformers
    from pydoc_data.topics import topics

    from meshtron.data.tokenizer import train_bpe
    bpe = train_bpe(list(topics.values()), 1000)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=bpe.vocab_size, n_positions=CTX, bos_token_id=bpe.eot_id,
        eos_token_id=bpe.eot_id))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(path)
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.hf_tokenizer, eos_token="<|endoftext|>",
                                         bos_token="<|endoftext|>").save_pretrained(path)


MC = [("The capital of France is", ["Paris", "London", "Rome"], 0),
      ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin"], 0),
      ("A function is defined with the keyword", ["def", "func", "lambda"], 0),
      ("To iterate over a list use a", ["for loop", "while loop", "class"], 0),
      ("Exceptions are raised with", ["raise", "throw", "panic"], 0),
      ("The opposite of true is", ["false", "maybe", "none"], 0),
      ("Strings are enclosed in", ["quotes", "brackets", "braces"], 0),
      ("Modules are loaded with", ["import", "include", "require"], 0)]
GEN = ["The meaning of", "A list comprehension", "In Python, a class", "The interpreter reads",
       "Keyword arguments are", "An iterator returns"]


def write_tasks(folder: str) -> None:
    data = os.path.join(folder, "data")
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, "mc.jsonl"), "w") as f:
        for q, choices, label in MC:
            f.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
    with open(os.path.join(data, "gen.jsonl"), "w") as f:
        for p in GEN:
            f.write(json.dumps({"prompt": p, "target": ""}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    with open(os.path.join(folder, "meshtron_mc.yaml"), "w") as f:
        f.write(f"task: meshtron_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {data}/mc.jsonl\n"
                "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n")
    with open(os.path.join(folder, "meshtron_gen.yaml"), "w") as f:
        f.write(f"task: meshtron_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {data}/gen.jsonl\n"
                "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
                f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {NEW}\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n")


def start_server(path: str, mesh: str, log):
    import httpx

    from meshtron.launch import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, path, "--mesh", mesh, "--port", str(port),
                             "--served-model-name", "tiny"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"meshtron serve did not start; see {log.name}")


def stop(proc) -> None:
    from common import stop_process_group
    stop_process_group(proc)


def samples(out_dir: str, task: str) -> list[dict]:
    [path] = glob.glob(os.path.join(out_dir, "**", f"samples_{task}_*.jsonl"), recursive=True)
    with open(path) as f:
        return sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])


def transformers_loglikelihood(path: str, pairs: list[tuple[str, str]]) -> list[float]:
    import torch
    import transformers

    from meshtron.cli.eval import encode_pair
    from meshtron.data import load_tokenizer
    tok = load_tokenizer(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    out = []
    for context, continuation in pairs:
        ctx, cont = encode_pair(tok, context, continuation)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0, :-1].double(), -1)[len(ctx) - 1:]
        out.append(sum(lp[j, t].item() for j, t in enumerate(cont)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mesh", default="model:2")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "lm_eval.md"))
    args = ap.parse_args()
    ensure_lm_eval()
    env = {**os.environ, **OFFLINE}
    os.environ.update(OFFLINE)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="meshtron-lm-eval-") as tmp:
        model_dir, tasks, out_dir = (os.path.join(tmp, d) for d in ("model", "tasks", "out"))
        make_model(model_dir)
        write_tasks(tasks)
        log = open(os.path.join(tmp, "server.log"), "w+")
        url, proc = start_server(model_dir, args.mesh, log)
        try:
            t0 = time.time()
            cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
                   f"model=tiny,base_url={url}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
                   f"tokenized_requests=True,max_length={CTX - 1},num_concurrent=4,max_retries=1",
                   "--tasks", "meshtron_mc,meshtron_gen", "--include_path", tasks, "--output_path", out_dir,
                   "--log_samples", "--batch_size", "4"]
            run = subprocess.run(cmd, env={**env, "HF_DATASETS_CACHE": os.path.join(tmp, "hf-datasets")},
                                 capture_output=True, text=True, timeout=1800)
            lm_eval_s = time.time() - t0
            if run.returncode != 0:
                print(run.stdout[-4000:], run.stderr[-8000:], sep="\n")
                log.seek(0)
                print(log.read()[-4000:])
                return 1
        finally:
            stop(proc)
        mc, gen = samples(out_dir, "meshtron_mc"), samples(out_dir, "meshtron_gen")
        # logged samples: arguments {"gen_args_i": {"arg_0": context, "arg_1": continuation}}, resps as strings
        pairs = [(s["arguments"][f"gen_args_{i}"]["arg_0"], s["arguments"][f"gen_args_{i}"]["arg_1"])
                 for s in mc for i in range(len(s["arguments"]))]
        reported = [(float(r[0][0]), r[0][1] == "True") for s in mc for r in s["resps"]]
        with open(os.path.join(tmp, "items.jsonl"), "w") as f:
            for c, x in pairs:
                f.write(json.dumps({"context": c, "continuation": x}) + "\n")
        mine = subprocess.run([sys.executable, "-m", "meshtron", "eval", model_dir, "--loglikelihood",
                               os.path.join(tmp, "items.jsonl"), "--mesh", args.mesh], capture_output=True, text=True,
                              env=env, timeout=600)
        if mine.returncode != 0:
            print(mine.stderr)
            return 1
        ours = [json.loads(line) for line in mine.stdout.splitlines()]
        ref = transformers_loglikelihood(model_dir, pairs)
        d_ours = max(abs(r[0] - o["loglikelihood"]) for r, o in zip(reported, ours, strict=True))
        d_ref = max(abs(r[0] - w) for r, w in zip(reported, ref, strict=True))
        greedy_ok = all(r[1] == o["is_greedy"] for r, o in zip(reported, ours))
        prompts = [s["arguments"]["gen_args_0"]["arg_0"] for s in gen]
        cmd = [sys.executable, "-m", "meshtron", "generate", model_dir, "--mesh", args.mesh, "--temperature", "0",
               "--max-new-tokens", str(NEW), "--stop", "\n"]
        for p in prompts:
            cmd += ["--prompt", p]
        g = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if g.returncode != 0:
            print(g.stderr)
            return 1
        texts = _blocks(g.stdout, len(prompts))
        lm_texts = [s["resps"][0][0] for s in gen]
        same_text = sum(a == b for a, b in zip(texts, lm_texts))
    ok = d_ours <= 1e-4 and d_ref <= 1e-4 and greedy_ok and same_text == len(prompts)
    import lm_eval
    lines = [
        "# lm-evaluation-harness against `meshtron serve`", "",
        f"Command: `.venv/bin/python bench/lm_eval_serve.py` (mesh `{args.mesh}`, lm-eval {lm_eval.__version__}, "
        f"`--model local-completions`, token-id requests). Run took {time.time() - t_start:.0f} s "
        f"(lm-eval itself {lm_eval_s:.0f} s).", "",
        "| check | result |", "|---|---|",
        f"| loglikelihood requests (multiple choice: {len(MC)} items x 3 choices) | {len(reported)} |",
        f"| max abs(lm-eval's loglikelihood - `meshtron eval --loglikelihood`'s) | {d_ours:.2e} |",
        f"| max abs(lm-eval's loglikelihood - transformers') | {d_ref:.2e} |",
        f"| greedy flags equal | {'yes' if greedy_ok else 'NO'} |",
        f"| `generate_until` outputs equal to `meshtron generate`'s greedy text | {same_text} of {len(prompts)} "
        f"(mean {sum(map(len, lm_texts)) / len(lm_texts):.0f} characters; {sum(1 for t in lm_texts if t)} non-empty) |",
        "", f"Overall: **{'PASS' if ok else 'FAIL'}**", ""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    if not ok:
        for a, b in zip(texts, lm_texts):
            if a != b:
                print(f"meshtron generate {a!r} != lm-eval {b!r}")
    return 0 if ok else 1


def _blocks(stdout: str, n: int) -> list[str]:
    """`meshtron generate` with several prompts prints each completion on the line after `--- i` (one line each:
    the stop sequence is a newline)."""
    lines = stdout.split("\n")
    return [lines[lines.index(f"--- {i}") + 1] for i in range(n)]


if __name__ == "__main__":
    sys.exit(main())
