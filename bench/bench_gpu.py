"""meshtron on one GPU against Hugging Face `transformers`: a GPT-2 training step, and decoding.

    python3 bench/bench_gpu.py                      # on a CUDA machine: about 3 minutes on one H200
    python3 bench/bench_gpu.py --device cpu --tiny  # the same script, tiny shapes, on the CPU (a smoke test)

Training: GPT-2 small (124M) and medium (350M) at sequence 1024, random weights, bf16 autocast with float32
master weights, fused AdamW, global-norm clipping at 1.0, dropout 0 (both sides then use fused attention:
meshtron through `scaled_dot_product_attention`, transformers with `attn_implementation="sdpa"`). The
contenders alternate in blocks of steps in one run (each block starts and ends synchronised); the table shows
medians: ms per step, tokens/s, MFU against the GPU's datasheet bf16 peak (`meshtron.train.flops`), and peak
memory. `meshtron --compile` is the same model with each block compiled by `torch.compile`; it is reported
(and its failure, if it fails) so that a `--compile` option is offered only where it pays.
Decoding: GPT-2 small in bf16, greedy, 128 new tokens after 128-token prompts at batch 1 and 8, meshtron's
KV-cache engine against `transformers.generate` on the same weights, alternating.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"gpt2": dict(n_layer=12, n_embd=768, n_head=12, batch=16),
          "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, batch=8)}
TINY = {"tiny": dict(n_layer=2, n_embd=64, n_head=4, batch=2)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_model(shape: dict, vocab: int, seq: int, device, dtype=torch.float32):
    import transformers
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=seq, n_layer=shape["n_layer"],
                                  n_embd=shape["n_embd"], n_head=shape["n_head"], resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype)


class HFStep:
    """transformers' GPT-2 trained as meshtron trains: bf16 autocast, fused AdamW (no decay on norms and
    biases), global-norm clipping."""

    def __init__(self, model, device, lr=1e-4):
        self.model, self.device = model, device
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay,
                                      "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), fused=True)

    def step(self, batch):
        x = batch[:, :-1].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def meshtron_step(shape: dict, vocab: int, seq: int, device, compile_blocks: bool = False):
    from meshtron.mesh import Mesh
    from meshtron.models import ModelConfig, build_model
    from meshtron.train.step import TrainStep
    cfg = ModelConfig("gpt", vocab_size=vocab, n_layer=shape["n_layer"], n_head=shape["n_head"],
                      d_model=shape["n_embd"], max_seq_len=seq)
    model = build_model(cfg, Mesh.from_spec("model:1", device=device.type), seed=0)
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    trainer = TrainStep(model, model.mesh, lr=1e-4, bf16=True, clip=1.0)
    return trainer, cfg


def time_blocks(contenders: dict, batch, device, blocks: int, steps: int) -> dict:
    """Median seconds per step of each contender over `blocks` alternating blocks (after one warm-up block)."""
    times = {name: [] for name in contenders}
    for b in range(blocks + 1):
        names = list(contenders) if b % 2 == 0 else list(contenders)[::-1]
        for name in names:
            step = contenders[name]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(batch)
            sync(device)
            if b:
                times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_memory(device, fn, batch) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats(device)
    fn(batch)
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def bench_training(shapes: dict, seq: int, vocab: int, device, blocks: int, steps: int, try_compile: bool):
    from meshtron.train.flops import gpu_peak_flops, measure_peak_flops, model_flops_per_token
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, torch.bfloat16) or measure_peak_flops(device, torch.bfloat16)
    else:
        name, peak = "cpu", measure_peak_flops(device, torch.bfloat16)
    rows = []
    for label, shape in shapes.items():
        batch = torch.randint(0, vocab, (shape["batch"], seq + 1), generator=torch.Generator().manual_seed(0))
        if device.type == "cuda":
            batch = batch.pin_memory()
        trainer, cfg = meshtron_step(shape, vocab, seq, device)
        hf = HFStep(hf_model(shape, vocab, seq, device), device)
        contenders = {"meshtron": trainer.step, "transformers": hf.step}
        compile_note = ""
        if try_compile:
            try:
                compiled, _ = meshtron_step(shape, vocab, seq, device, compile_blocks=True)
                compiled.step(batch)                                   # compile outside the timed blocks
                contenders["meshtron --compile"] = compiled.step
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                compile_note = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        memory = {n: peak_memory(device, fn, batch) for n, fn in contenders.items()}
        t = time_blocks(contenders, batch, device, blocks, steps)
        tokens = shape["batch"] * seq
        flops = model_flops_per_token(cfg, seq)
        for n in contenders:
            rows.append((label, n, t[n] * 1e3, tokens / t[n], tokens / t[n] * flops / peak, memory[n],
                         t[n] / t["transformers"]))
        if compile_note:
            rows.append((label, compile_note, float("nan"), float("nan"), float("nan"), float("nan"), float("nan")))
        del trainer, hf, contenders
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = [f"Training step on {name} (peak bf16 {peak / 1e12:.0f} TFLOP/s), sequence {seq}, bf16 autocast, "
             f"fused AdamW, dropout 0; medians of {blocks} alternating blocks of {steps} steps:", "",
             "| model | contender | ms/step | tokens/s | MFU | peak GiB | time vs transformers |",
             "|---|---|---|---|---|---|---|"]
    for label, n, ms, tps, m, mem, ratio in rows:
        lines.append(f"| {label} | {n} | {ms:.1f} | {tps:,.0f} | {m:.1%} | {mem:.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def bench_decode(shape: dict, vocab: int, device, repeats: int, new: int, prompt_len: int, batches=(1, 8)):
    from meshtron.inference import Engine, Request, SamplingParams
    from meshtron.interop import build_from_hf
    from meshtron.mesh import Mesh
    import tempfile
    torch.manual_seed(0)
    hf = hf_model(shape, vocab, 1024, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        model = build_from_hf(path, Mesh.from_spec("model:1", device=device.type)).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(dtype)
    hf = hf.to(device=device, dtype=dtype).eval()
    lines = ["", f"Decoding ({dtype}, greedy, {prompt_len}-token prompts, {new} new tokens; medians of {repeats}):",
             "", "| batch | meshtron tok/s | transformers tok/s | speed-up | same tokens |", "|---|---|---|---|---|"]
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
        times = {"meshtron": [], "transformers": []}
        same = True
        for r in range(repeats + 1):
            for name in (("meshtron", "transformers") if r % 2 == 0 else ("transformers", "meshtron")):
                sync(device)
                t0 = time.perf_counter()
                if name == "meshtron":
                    done = Engine(model).generate([Request(b, row, SamplingParams(new, temperature=0,
                                                                                   ignore_eos=True))
                                                   for b, row in enumerate(ids.tolist())])
                    got = [c.token_ids for c in done]
                else:
                    x = ids.to(device)
                    with torch.no_grad():
                        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=0)
                    want = out[:, prompt_len:].tolist()
                sync(device)
                if r:
                    times[name].append(batch * new / (time.perf_counter() - t0))
            same = same and got == want
        m, h = statistics.median(times["meshtron"]), statistics.median(times["transformers"])
        lines.append(f"| {batch} | {m:,.0f} | {h:,.0f} | {m / h:.2f}x | {'yes' if same else 'no (bf16 ties)'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the script itself)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device is visible; run with --device cpu --tiny for a smoke test")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.tiny:
        shapes, seq, vocab, blocks, steps, repeats, new, plen = TINY, 64, 257, 2, 2, 1, 8, 16
    else:
        shapes, seq, vocab, blocks, steps, repeats, new, plen = SHAPES, 1024, 50257, 5, 10, 3, 128, 128
    text = bench_training(shapes, seq, vocab, device, blocks, steps, try_compile=not args.no_compile)
    print(text, flush=True)
    dec = bench_decode(next(iter(shapes.values())), vocab, device, repeats, new, plen)
    print(dec, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_bench.md"), "w") as f:
            f.write(text + "\n" + dec + "\n")


if __name__ == "__main__":
    main()
