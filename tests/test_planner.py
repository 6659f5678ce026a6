"""The planner: formulas against their papers, the Narayanan et al. Table 1 acceptance, the CLI and its errors,
hardware profiles, and Hugging Face configs. Pure arithmetic except one cpu calibration (a few seconds)."""
from __future__ import annotations

import json
import time

import pytest
import torch

import meshtron.cli as cli
from meshtron.models.config import PRESETS, ModelConfig
from meshtron.models.hf_config import HFConfigError, config_from_hf, load_hf_config
from meshtron.planner import BUILTIN, HardwareError, ParallelLayout, PlanError, get_profile, plan, predict
from meshtron.planner import cost_model as cm
from meshtron.planner.hardware import load_profile_file

A100 = BUILTIN["a100-80gb"]
SEQ, VOCAB = 2048, 51200

# Narayanan et al. 2021, Table 1 (REFERENCE.md), with the micro-batch size and interleaving (v) of the paper's
# own run scripts (Megatron-LM examples/sc21/run_table_1.sh). All runs used full activation recompute.
# params(B), heads, hidden, layers, t, p, GPUs, batch, TFLOP/s per GPU, micro-batch, v
TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 16, 1),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 16, 1),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 16, 1),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 8, 1),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 4, 1),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 2, 3),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 2, 2),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 1, 2),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 1, 3),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 1, 1),
]
# Rows where the planner ranks other meshes above the paper's: it predicts a narrower model axis with a
# deeper (interleaved) pipeline to be faster, while the paper filled the 8-GPU model axis before adding pipeline
# stages (its "Takeaway #1"). Limited to the paper's pipeline depth, the paper's layout is the planner's first.
DEEPER_PIPELINE_PREFERRED = {18.4, 39.1}
PAPER_OPTIONS = dict(recompute="full", sequence_parallel=False, sharded_optimizer=False)  # Megatron in 2021


def paper_model(heads: int, hidden: int, layers: int) -> ModelConfig:
    return ModelConfig("gpt", vocab_size=VOCAB, n_layer=layers, n_head=heads, d_model=hidden, max_seq_len=SEQ,
                       dropout=0.1)


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(cli, "COMMANDS", {"plan": "choose a mesh"})   # dispatch to plan alone
    code = cli.main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- formulas against their sources ---------------------------------------------------------------------------

@pytest.mark.parametrize("row", TABLE_1, ids=lambda r: f"{r[0]}B")
def test_flops_are_narayanans_formula(row):
    _, a, h, L, *_rest = row
    cfg, B = paper_model(a, h, L), row[7]
    paper = 96 * B * SEQ * L * h * h * (1 + SEQ / (6 * h) + VOCAB / (16 * L * h))
    assert cm.training_flops(cfg, B, SEQ, recompute=True) == pytest.approx(paper, rel=1e-12)
    no_recompute = 72 * B * SEQ * L * h * h * (1 + SEQ / (6 * h)) + 6 * B * SEQ * h * VOCAB
    assert cm.training_flops(cfg, B, SEQ, recompute=False) == pytest.approx(no_recompute, rel=1e-12)


def test_activation_bytes_are_korthikantis():
    cfg = paper_model(48, 6144, 40)
    s, b, h, a, t = SEQ, 2, 6144, 48, 8
    sbh, attn = s * b * h, a * s / h
    act = lambda **kw: cm.layer_activation_bytes(cfg, s, b, elem=2, dropout=True, fused_attention=False, **kw)
    # the paper's 5·a·s/h counts the 16-bit dropout output (2 of the 5) that meshtron recomputes in backward
    kept = 5 - 2
    assert act(tp=1, sp=False) == pytest.approx(sbh * (34 + kept * attn))
    assert act(tp=t, sp=False) == pytest.approx(sbh * (10 + 24 / t + kept * attn / t))
    assert act(tp=t, sp=True) == pytest.approx(sbh * (34 / t + kept * attn / t))
    assert cm.checkpoint_bytes(cfg, s, b, 1, False, 2) == 2 * sbh
    assert cm.score_bytes(cfg, s, b, t, 2, dropout=True) == pytest.approx(sbh * kept * attn / t)
    # fp32 doubles every 16-bit tensor but not the 1-byte dropout masks: 16·4 + 2 and 4 + 1
    fp32 = cm.layer_activation_bytes(cfg, s, b, 1, False, 4, dropout=True, fused_attention=False)
    assert fp32 == pytest.approx(sbh * (66 + 5 * attn))
    fused = cm.layer_activation_bytes(cfg, s, b, 1, False, 2, dropout=False, fused_attention=True)
    assert fused == pytest.approx(sbh * 32)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["fused", "dropout"])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_activation_bytes_match_what_meshtrons_layers_save(family, dropout):
    """The per-layer and head terms against the tensors autograd actually keeps for meshtron's own GPT and
    Llama (fp32; no dropout: fused attention; dropout: the explicit attention with its masks), one process:
    bench/bench_planner.py checks whole runs."""
    import torch
    from meshtron.mesh import Mesh
    from meshtron.models import build_model

    cfg = ModelConfig(family, vocab_size=97, n_layer=1, n_head=4, n_kv_head=2 if family == "llama" else None,
                      d_model=128, d_ff=384, max_seq_len=64, dropout=dropout)
    s, b = 64, 2

    def saved(n_layer: int) -> int:
        model = build_model(cfg.replace(n_layer=n_layer), Mesh.from_spec("model:1"))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        idx = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx[:, :-1], idx[:, 1:])
        return sum(kept.values())

    one, three = saved(1), saved(3)
    layer = cm.layer_activation_bytes(cfg, s, b, 1, False, 4, dropout=dropout > 0, fused_attention=dropout == 0)
    assert (three - one) / 2 == pytest.approx(layer, rel=0.05)
    head = cm.head_activation_bytes(cfg, s, b, 1, False, 4)
    head += cm.embedding_activation_bytes(cfg, s, b, 1, False, dropout > 0)
    assert one - layer == pytest.approx(head, rel=0.1)


def test_allocator_and_optimizer_step_memory():
    """The allocator's share is the cpu profile's alone; the optimizer step's buffer shows only where it exceeds
    the activations it replaces (a tiny batch)."""
    cfg = PRESETS["gpt2-xl"]
    pred = predict(cfg, ParallelLayout(dp=16, micro_batch=16), A100, global_batch=512, seq_len=1024)
    assert pred.memory["allocator"] == 0 and pred.memory["optimizer_step"] == 0
    small = predict(PRESETS["gpt2"], ParallelLayout(dp=1, micro_batch=1), A100, global_batch=1, seq_len=16)
    assert small.memory["optimizer_step"] == pytest.approx(max(0.0, cm.optimizer_temp_bytes(
        cm.stage_params(PRESETS["gpt2"], 1, 1, "last"), False, 1) - small.memory["activations"]))
    # gradient accumulation under DDP holds one more fp32 copy of the gradients; without DDP or accumulation, none
    n = cm.stage_params(PRESETS["gpt2"], 1, 1, "last")
    accum = predict(PRESETS["gpt2"], ParallelLayout(dp=2, micro_batch=1), A100, global_batch=4, seq_len=16)
    assert accum.memory["accumulation"] == pytest.approx(n * cm.ACCUMULATION_GRAD_BYTES)
    for lay, gb in ((ParallelLayout(dp=2, micro_batch=2), 4), (ParallelLayout(dp=1, micro_batch=1), 4)):
        assert "accumulation" not in predict(PRESETS["gpt2"], lay, A100, global_batch=gb, seq_len=16).memory


def test_bytes_per_parameter_table():
    assert sum(cm.state_bytes_per_param("fp32", False, 4)) == 16
    assert sum(cm.state_bytes_per_param("fp32", True, 4)) == 8 + 8 / 4
    assert sum(cm.state_bytes_per_param("bf16", False, 4)) == 16           # meshtron keeps fp32 master weights
    assert sum(cm.state_bytes_per_param("bf16", True, 4)) == 8 + 8 / 4


def test_pipeline_bubble_and_memory_options():
    cfg = PRESETS["gpt2-xl"]
    base = dict(global_batch=64, seq_len=1024)
    lay = ParallelLayout(dp=2, tp=1, pp=4, micro_batch=2)
    pred = predict(cfg, lay, A100, **base)
    m = 64 // (2 * 2)
    assert pred.time["bubble"] == pytest.approx(pred.time["compute"] * 3 / m, rel=0.05)
    inter = predict(cfg, ParallelLayout(dp=2, tp=1, pp=4, micro_batch=2, virtual_stages=2), A100, **base)
    assert inter.time["bubble"] < pred.time["bubble"]
    recompute = predict(cfg, ParallelLayout(dp=2, pp=4, micro_batch=2, recompute="full"), A100, **base)
    assert recompute.memory["activations"] < pred.memory["activations"]
    assert recompute.time["compute"] > pred.time["compute"]
    sharded = predict(cfg, ParallelLayout(dp=2, pp=4, micro_batch=2, sharded_optimizer=True), A100, **base)
    assert sharded.memory["optimizer"] == pytest.approx(pred.memory["optimizer"] / 2)
    tp = predict(PRESETS["llama-7b"], ParallelLayout(dp=1, tp=4, micro_batch=1), A100, **base)
    sp = predict(PRESETS["llama-7b"], ParallelLayout(dp=1, tp=4, micro_batch=1, sequence_parallel=True),
                 A100, **base)
    assert sp.memory["activations"] < tp.memory["activations"]
    assert lay.mesh == "pipe:4,batch:2" and ParallelLayout(4, 8).mesh == "batch:4,model:8"
    assert ParallelLayout(2, 8, 4).mesh == "pipe:4,batch:2,model:8"


# --- acceptance: Narayanan et al. 2021, Table 1 ---------------------------------------------------------------

@pytest.mark.parametrize("row", TABLE_1, ids=lambda r: f"{r[0]}B")
def test_reference_table_throughput_within_10_percent(row):
    size, a, h, L, t, p, n, B, tflops, mb, v = row
    layout = ParallelLayout(n // (t * p), t, p, mb, virtual_stages=v, **PAPER_OPTIONS)
    pred = predict(paper_model(a, h, L), layout, A100, global_batch=B, seq_len=SEQ)
    assert pred.fits
    assert pred.tflops_per_gpu == pytest.approx(tflops, rel=0.10)
    assert pred.hfu == pytest.approx(pred.tflops_per_gpu / 312)


@pytest.mark.parametrize("row", TABLE_1, ids=lambda r: f"{r[0]}B")
def test_reference_table_through_the_cli(row, capsys, monkeypatch, tmp_path):
    """The same rows through `meshtron plan`, from the paper's model as a Hugging Face GPT-2 config (whose
    dropout, transformers' default 0.1, makes attention keep its scores: no fused-attention shortcut)."""
    size, a, h, L, t, p, n, B, tflops, mb, v = row
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": h, "n_layer": L, "n_head": a,
                                                      "n_positions": SEQ, "vocab_size": VOCAB}))
    code, out, err = run_cli(capsys, monkeypatch, "--model", str(tmp_path), "--gpus", str(n), "--global-batch",
                             str(B), "--seq-len", str(SEQ), "--micro-batch", str(mb), "--recompute", "full",
                             "--sequence-parallel", "off", "--sharded-optimizer", "off", "--all", "--json")
    assert code in (0, 1), err
    rows = json.loads(out)
    paper = [r for r in rows if (r["dp"], r["tp"], r["pp"], r["virtual_stages"]) == (n // (t * p), t, p, v)]
    assert len(paper) == 1 and paper[0]["fits"]
    assert paper[0]["tflops_per_gpu"] == pytest.approx(tflops, rel=0.10)


@pytest.mark.parametrize("row", TABLE_1, ids=lambda r: f"{r[0]}B")
def test_reference_table_paper_layout_ranks_top_3(row):
    size, a, h, L, t, p, n, B, *_ = row
    cfg, dp = paper_model(a, h, L), n // (t * p)
    result = plan(cfg, A100, n, global_batch=B, seq_len=SEQ, **PAPER_OPTIONS)
    rank = result.rank_of(dp, t, p)
    if size in DEEPER_PIPELINE_PREFERRED:
        ahead = result.per_mesh[:rank - 1]
        assert all(x.layout.tp < t and x.layout.pp > p for x in ahead[:3])
        assert rank > 3
    else:
        assert rank <= 3
    same_depth = plan(cfg, A100, n, global_batch=B, seq_len=SEQ, max_pp=p, **PAPER_OPTIONS)
    assert same_depth.rank_of(dp, t, p) <= 3


# --- the command line -----------------------------------------------------------------------------------------

def test_cli_json_is_ranked_best_first(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "--model", "gpt2", "--gpus", "16", "--global-batch", "256",
                           "--json")
    assert code == 0
    rows = json.loads(out)
    keys = {"dp", "tp", "pp", "micro_batch", "memory_gb", "fits", "step_time_s", "tflops_per_gpu", "mfu", "mesh"}
    assert rows and all(keys <= set(r) for r in rows)
    assert all(r["dp"] * r["tp"] * r["pp"] == 16 for r in rows)
    fitting = [r["step_time_s"] for r in rows if r["fits"]]
    assert fitting == sorted(fitting) and rows[0]["fits"]
    assert len({(r["dp"], r["tp"], r["pp"]) for r in rows}) == len(rows)     # one row per mesh
    assert all(r["tp"] <= 8 for r in rows)                                  # the model axis stays in a node


def test_cli_table_from_hf_config_names_the_pipeline(capsys, monkeypatch, tmp_path):
    big = {"model_type": "gpt2", "n_embd": 12288, "n_layer": 80, "n_head": 96, "n_positions": 2048,
           "vocab_size": 51200}
    (tmp_path / "config.json").write_text(json.dumps(big))
    code, out, err = run_cli(capsys, monkeypatch, "--model", str(tmp_path), "--gpus", "256", "--global-batch",
                             "1024", "--seq-len", "2048", "--top", "5")
    assert code == 0, err                                # a 145B model fits only with a pipeline axis
    assert "chosen: --mesh pipe:" in out and "model:8" in out
    assert "--pipeline-schedule" in out and "run it: meshtron train" in out


@pytest.mark.parametrize("args, code, message", [
    (["--model", "gpt2", "--gpus", "8", "--gpu", "b200", "--global-batch", "8"], 2, "unknown GPU 'b200'"),
    (["--model", "llama-7b", "--gpus", "1", "--gpu", "v100-32gb", "--global-batch", "8"], 1, "no layout fits"),
    (["--model", "gpt2", "--gpus", "7", "--global-batch", "8"], 2, "no legal layout of 7 device"),
    (["--model", "gpt-5", "--gpus", "8", "--global-batch", "8"], 2, "unknown model 'gpt-5'"),
    (["--model", "gpt2", "--gpus", "8", "--global-batch", "8", "--seq-len", "4096"], 2, "exceeds the model's"),
])
def test_cli_bad_input_gets_a_clear_message(capsys, monkeypatch, args, code, message):
    got, out, err = run_cli(capsys, monkeypatch, *args)
    assert got == code
    assert message in err and "Traceback" not in err + out


def test_no_legal_layout_says_why():
    with pytest.raises(PlanError) as e:
        plan(PRESETS["gpt2"], A100, 7, global_batch=8, seq_len=1024)
    text = str(e.value)
    assert "dp=7" in text and "does not divide the 12 layers" in text and "heads=12" in text


def test_model_axis_stays_inside_a_node_unless_allowed():
    cfg = paper_model(64, 8192, 48)
    inside = plan(cfg, A100, 64, global_batch=64, seq_len=SEQ, max_pp=1)
    assert max(p.layout.tp for p in inside.ranked) == 8
    across = plan(cfg, A100, 64, global_batch=64, seq_len=SEQ, max_pp=1, allow_cross_node_tp=True)
    assert max(p.layout.tp for p in across.ranked) == 64


# --- hardware profiles ----------------------------------------------------------------------------------------

def test_profile_files(tmp_path):
    toml = tmp_path / "mygpu.toml"
    toml.write_text('base = "a100-80gb"\nmemory_gib = 40\n[peak_tflops]\nfp8 = 624\n')
    prof = get_profile(str(toml))
    assert prof.name == "mygpu" and prof.memory_gib == 40 and prof.peak_tflops["bf16"] == 312
    js = tmp_path / "other.json"
    js.write_text(json.dumps({"name": "x", "peak_tflops": {"bf16": 100}, "memory_gib": 16,
                              "memory_bandwidth_gbs": 500, "intra_node_bandwidth_gbs": 50,
                              "inter_node_bandwidth_gbs": 10}))
    assert load_profile_file(str(js)).peak_flops("bf16") == 100e12
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "a100-80gb"\nmemroy_gib = 40\n')
    with pytest.raises(HardwareError, match="memroy_gib"):
        get_profile(str(bad))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"name": "y", "memory_gib": 16}))
    with pytest.raises(HardwareError, match="missing field"):
        load_profile_file(str(partial))


def test_cpu_profile_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHTRON_CACHE_DIR", str(tmp_path))
    from meshtron.cli.calibrate import measure
    from meshtron.planner.calibrate import cpu_profile
    from meshtron.planner.hardware import HardwareError
    with pytest.raises(HardwareError, match="run `meshtron calibrate`"):
        cpu_profile()                                        # the planner never measures by itself
    first = cpu_profile(measure=measure)
    start = time.perf_counter()
    again = cpu_profile()
    assert time.perf_counter() - start < 0.5 and again == first
    assert first.peak_tflops["fp32"] > 0 and first.intra_node_bandwidth_gbs > 0
    assert 0.05 < first.runtime_overhead_gib < 2
    assert first.runtime_overhead_bytes == first.runtime_overhead_gib * 2 ** 30
    two = cpu_profile(threads_per_rank=2)
    assert two.peak_tflops["fp32"] == pytest.approx(2 * first.peak_tflops["fp32"])
    pred = predict(PRESETS["gpt-mini"], ParallelLayout(dp=2, tp=2, micro_batch=4), first, global_batch=8,
                   seq_len=128)
    assert pred.fits and pred.step_time_s > 0
    assert pred.memory["runtime"] == first.runtime_overhead_bytes

    # the profile knows whether dropout attention runs as the compiled loop: then it is timed as the fused kernel
    # (its s² work stays in cache), its memory unchanged; without dropout nothing changes
    from dataclasses import replace
    from meshtron.parallel import cpu_kernels
    assert first.dropout_attention_loop == cpu_kernels.attention_fits(*(torch.zeros(1, 1, 1, 1),) * 3)
    lay, cfg = ParallelLayout(dp=1, tp=2, micro_batch=4), PRESETS["gpt-mini"].replace(dropout=0.1)
    on, off = (predict(c, lay, replace(first, dropout_attention_loop=flag), global_batch=4, seq_len=128)
               for c, flag in ((cfg, True), (cfg, False)))
    assert on.step_time_s < off.step_time_s and on.memory == off.memory
    plain = [predict(PRESETS["gpt-mini"], lay, replace(first, dropout_attention_loop=f), global_batch=4,
                     seq_len=128).step_time_s for f in (True, False)]
    assert plain[0] == plain[1]


# --- Hugging Face configs -------------------------------------------------------------------------------------

GPT2_HF = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
           "n_head": 12, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
           "tie_word_embeddings": True, "resid_pdrop": 0.1}
LLAMA_HF = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
            "tie_word_embeddings": False, "hidden_act": "silu"}


def test_config_from_hf_gpt2_and_llama_match_the_presets():
    assert config_from_hf(GPT2_HF) == PRESETS["gpt2"]
    assert config_from_hf(LLAMA_HF) == PRESETS["llama-7b"]
    gqa = config_from_hf({**LLAMA_HF, "model_type": "mistral", "num_key_value_heads": 8, "rope_theta": 1e6,
                          "sliding_window": None, "tie_word_embeddings": True})
    assert (gqa.kv_heads, gqa.rope_theta, gqa.tied, gqa.family) == (8, 1e6, True, "llama")
    new_style = {k: v for k, v in LLAMA_HF.items() if k not in ("rope_theta", "rope_scaling")}
    new_style["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    assert config_from_hf(new_style).rope_theta == 500000.0
    wide = config_from_hf({**GPT2_HF, "n_inner": 4096, "tie_word_embeddings": False})
    assert wide.ffn_dim == 4096 and not wide.tied


def test_config_from_hf_matches_transformers_defaults():
    transformers = pytest.importorskip("transformers")
    assert config_from_hf(transformers.GPT2Config().to_dict()) == PRESETS["gpt2"]
    llama = transformers.LlamaConfig(max_position_embeddings=4096, num_key_value_heads=8).to_dict()
    assert config_from_hf(llama) == PRESETS["llama-7b"].replace(n_kv_head=8)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bert"}, "model_type 'bert' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type='yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}, "sliding_window=4096"),
    ({"hidden_size": None}, "lacks required field(s): hidden_size"),
])
def test_config_from_hf_refuses_what_meshtron_cannot_build(change, message):
    with pytest.raises(HFConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config_from_hf({**LLAMA_HF, **change})


def test_config_from_hf_refuses_other_gpt2_variants():
    with pytest.raises(HFConfigError, match="activation_function='relu'"):
        config_from_hf({**GPT2_HF, "activation_function": "relu"})
    with pytest.raises(HFConfigError, match="scale_attn_by_inverse_layer_idx"):
        config_from_hf({**GPT2_HF, "scale_attn_by_inverse_layer_idx": True})


def test_load_hf_config_reads_a_folder_or_a_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2_HF))
    assert load_hf_config(str(tmp_path)) == GPT2_HF
    assert load_hf_config(str(tmp_path / "config.json")) == GPT2_HF
    with pytest.raises(HFConfigError, match="no Hugging Face config"):
        load_hf_config(str(tmp_path / "missing"))


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_backward_peak_matches_meshtrons_live_memory(recompute):
    """Gradients set to None after each step are allocated during the backward: the peak is the forward's
    activations (no recompute) or, with full recompute, every gradient plus the last layer's recomputed
    activations. The prediction's gradients + activations against the heap in use (glibc's mallinfo2) at every
    module hook of a real one-process step, above the heap in use between steps."""
    import ctypes
    import torch
    from meshtron.mesh import Mesh
    from meshtron.models import build_model
    from meshtron.train.step import TrainStep

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2")

    def in_use() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    cfg = ModelConfig("gpt", vocab_size=257, n_layer=4, n_head=4, d_model=256, max_seq_len=128)
    s, b = 128, 8
    model = build_model(cfg, Mesh.from_spec("model:1"), seed=0)
    trainer = TrainStep(model, Mesh.from_spec("model:1"), lr=1e-4, recompute=recompute)
    batch = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(0))
    trainer.step(batch)
    peak = [0]

    def mark(*_):
        peak[0] = max(peak[0], in_use())
    for module in model.modules():
        module.register_forward_hook(mark)
        module.register_full_backward_hook(mark)
    between = in_use()
    trainer.step(batch)
    measured = peak[0] - between
    pred = predict(cfg, ParallelLayout(dp=1, micro_batch=b, recompute=recompute), A100,
                   global_batch=b, seq_len=s, dtype="fp32")
    predicted = pred.memory["grads"] + pred.memory["activations"]
    assert predicted == pytest.approx(measured, rel=0.15), (predicted, measured)
    grads = cm.stage_params(cfg, 1, 1, "last") * 4
    if recompute == "full":        # the peak is at the end of the backward: every gradient exists
        assert pred.memory["grads"] == pytest.approx(grads)
    else:                          # at its start: the first layer's and the head's gradients only
        assert pred.memory["grads"] < grads / 2
