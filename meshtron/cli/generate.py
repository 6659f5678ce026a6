"""`meshtron generate CKPT_OR_HF_DIR --mesh model:2 --prompt "..."`: text from a checkpoint or a Hugging Face
folder, decoded with a KV cache on a mesh (tensor-parallel on the model axis, prompts split over the batch axis).

Invariant: the model, mesh, layout, tokenizer and prompts are checked in this process before any rank starts,
and every problem ends with one `meshtron generate: error: ...` line and exit code 2. Rank 0 prints the
completions on stdout (one prompt: its tokens as they come; several: each after `--- i` when all are done) and
a timing line on stderr.
"""
from __future__ import annotations

import argparse
import sys


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options `generate` and `serve` share."""
    p.add_argument("path", metavar="CKPT_OR_HF_DIR", help="a meshtron run or checkpoint folder, or a Hugging Face "
                   "folder (config.json + weights)")
    p.add_argument("--mesh", default="model:1", help="mesh axes and sizes, e.g. 'model:2' or 'batch:2,model:2' "
                   "(default model:1)")
    p.add_argument("--layout", default=None, help="layout rules (default: Mesh-TensorFlow's for the mesh's axes)")
    p.add_argument("--tokenizer", default=None, help="'byte', 'gpt2', a tokenizer.json or a tokenizer folder "
                   "(default: the one stored with the model)")
    p.add_argument("--threads-per-rank", type=int, default=None, help="compute threads of each rank (default: "
                   "the cores divided by the ranks)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens whose "
                   "probability reaches p (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0; prompt i uses seed + i)")
    p.add_argument("--stop", action="append", default=None, help="a stop sequence, trimmed from the output "
                   "(repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going after the end-of-text token")
    p.add_argument("--max-batch", type=int, default=32, help="prompts decoded at once per replica (default 32)")
    p.add_argument("--echo", action="store_true", help="print each prompt before its completion")


def check_model(path: str, mesh: str, layout: str | None, tokenizer: str | None, need_tokenizer: bool = True):
    """(ModelSource, tokenizer, world size), or ValueError saying what to change; builds nothing."""
    from meshtron.data import load_tokenizer
    from meshtron.layout import LayoutRules, validate
    from meshtron.load import describe
    from meshtron.mesh import parse_mesh_spec
    shape = parse_mesh_spec(mesh)
    src = describe(path)
    rules = LayoutRules.parse(layout) if layout else LayoutRules.default_for(shape)
    validate(rules, shape, src.config.dim_sizes())
    stages_axis = rules.as_dict().get("layers")
    if stages_axis and shape.get(stages_axis, 1) > 1:
        drop = ",".join(f"{a}:{n}" for a, n in shape.items() if a != stages_axis) or "model:1"
        raise ValueError(f"mesh {mesh!r} splits the layers into a {shape[stages_axis]}-stage pipeline (axis "
                         f"{stages_axis!r}); decoding and log-likelihood scoring do not run through a pipeline (only "
                         f"`meshtron eval --data` does): any checkpoint, pipelined or not, loads on a mesh without "
                         f"that axis, e.g. --mesh {drop}")
    spec = tokenizer or src.tokenizer_dir
    if spec is None:
        if need_tokenizer:
            raise ValueError(f"{path} holds no tokenizer: pass --tokenizer ('byte', 'gpt2', a tokenizer.json or a "
                             f"folder)")
        tok = None
    else:
        tok = load_tokenizer(spec)
    world = 1
    for size in shape.values():
        world *= size
    return src, tok, world


def run(args) -> int:
    from meshtron.inference import SamplingParams
    from meshtron.launch import RankError, run_ranks, under_launcher
    try:
        src, tok, world = check_model(args.path, args.mesh, args.layout, args.tokenizer)
        prompts = args.prompt or []
        if not prompts:
            raise ValueError("give at least one --prompt")
        ids = [tok.encode_prompt(p) or [tok.eot_id] for p in prompts]      # as transformers' tok(prompt)
        ctx = src.config.max_seq_len
        for p, i in zip(prompts, ids):
            if len(i) >= ctx:
                raise ValueError(f"the prompt {p[:40]!r}... has {len(i)} tokens; this model's context is {ctx}, so a "
                                 f"prompt may have at most {ctx - 1}")
            if max(i) >= src.config.vocab_size:
                raise ValueError(f"the tokenizer gives id {max(i)} but the model's vocabulary has "
                                 f"{src.config.vocab_size} tokens: give the model's own tokenizer (--tokenizer)")
        params = [SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed + b,
                                 tuple(args.stop or ()), args.ignore_eos) for b in range(len(ids))]
        for p in params:
            p.check()
        if args.max_batch < 1:
            raise ValueError("--max-batch must be at least 1")
    except ValueError as e:
        print(f"meshtron generate: error: {e}", file=sys.stderr)
        return 2
    job = (args.path, args.mesh, args.layout, args.tokenizer, ids, params, args.max_batch, args.threads_per_rank,
           prompts if args.echo else None)
    try:
        if under_launcher() or world == 1:
            _generate_rank(*job)
        else:
            run_ranks(_generate_rank, world, *job, threads_per_rank=args.threads_per_rank, timeout_s=24 * 3600)
    except RankError as e:
        print(f"meshtron generate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _generate_rank(path, mesh_spec, layout, tokenizer, ids, params, max_batch, threads, echo) -> None:
    import time

    import torch

    from meshtron.inference import Engine, Request, model_eos_ids
    from meshtron.load import open_model
    from meshtron.mesh import Mesh
    if threads:
        torch.set_num_threads(threads)
    mesh = Mesh.from_spec(mesh_spec)
    model, tok, src = open_model(path, mesh, layout, tokenizer)
    lead = mesh.rank == 0
    engine = Engine(model, tok, model_eos_ids(src, tok), text=lead)
    single = len(ids) == 1
    first = []
    if single and lead and echo:
        sys.stdout.write(echo[0])

    def show(ev) -> None:
        if not first:
            first.append(time.perf_counter())
        if single and lead and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()

    start = time.perf_counter()
    done = engine.generate([Request(b, p, sp) for b, (p, sp) in enumerate(zip(ids, params))], max_batch, show)
    elapsed = time.perf_counter() - start
    if not lead:
        return
    if single:
        sys.stdout.write("\n")
    else:
        for b, c in enumerate(done):
            sys.stdout.write(f"--- {b}\n{echo[b] if echo else ''}{c.text}\n")
    sys.stdout.flush()
    n = sum(len(c.token_ids) for c in done)
    reasons = ", ".join(sorted({c.finish_reason for c in done}))
    ttft = (first[0] - start) if first else float("nan")
    print(f"meshtron generate: {n} tokens in {elapsed:.2f} s ({n / max(elapsed, 1e-9):.1f} tokens/s, first token "
          f"after {ttft * 1000:.0f} ms) on mesh {mesh.spec}; finished: {reasons}", file=sys.stderr, flush=True)
