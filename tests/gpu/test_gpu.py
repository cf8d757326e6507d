"""What only a GPU shows: the Triton kernel compiled for the device, the sampler and one
next-token and one RLP iteration of ``tiny`` and ``tiny-hybrid`` in bf16 with the local spec
(megatron's fused softmax path) and with Transformer Engine when it imports, an NCCL group
(which rejects host tensors), and two GPUs where present.  Run by ``make gpu-check``."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(ROOT, "tests", "gpu", "run_iteration.py")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE")
# bf16: the sampler's decode (KV cache) and the update's full forward round differently; the
# output projection itself agrees to 1e-4 (tests/unit/test_sampler_gpu_numerics.py).
BF16_DRIFT = 5e-2

pytestmark = pytest.mark.cuda


def _te_imports() -> bool:
    from megatron_rlp.models.builder import transformer_engine_available

    return transformer_engine_available()


SPECS = [
    "local",
    pytest.param("te", marks=pytest.mark.skipif(not _te_imports(), reason="Transformer Engine does not import here")),
]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    return env


def _run(cmd: list, timeout: int = 600) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}")
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT=")), None)
    assert line is not None, f"no RESULT line:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads(line[len("RESULT="):])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from training_fixtures import write_corpus

    return write_corpus(str(tmp_path_factory.mktemp("gpu") / "corpus"), num_docs=64, seed=3)


def _check_iterations(result: dict, spec: str, world: int = 1) -> None:
    assert result["backend"] == "nccl" and result["world_size"] == world
    assert result["param_device"] == "cuda" and result["param_dtype"] == "torch.bfloat16"
    if spec == "local":
        assert result["core_attention"] == ["DotProductAttention"]
    else:
        assert all(name.startswith("TE") for name in result["core_attention"]), result["core_attention"]
    for objective, history in result["history"].items():
        (step,) = history
        key = "rlp loss" if objective == "rlp" else "lm loss"
        assert torch.isfinite(torch.tensor(step[key])) and torch.isfinite(torch.tensor(step["grad_norm"]))
        if objective == "rlp":
            assert 1 <= step["rlp/thought_len_mean"] <= 9
            assert step["rlp/sample_logprob_drift"] < BF16_DRIFT, step["rlp/sample_logprob_drift"]


# ------------------------------------------------------------------------------------- kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_matches_the_reference(dtype):
    from megatron_rlp.kernels import linear_logprob

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d, v, vocab = 777, 256, 5000, 4900  # ragged blocks; padded vocabulary rows; the forward
    # runs 9 vocabulary splits (few rows), the backward 8 (bf16) or 15 (fp32) d_logits chunks
    h = (torch.randn(n, d, device="cuda", generator=gen) * 2).to(dtype)
    w = (torch.randn(v, d, device="cuda", generator=gen) * 0.2).to(dtype)
    t = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    t[::7] = -100
    results = {}
    for impl in ("triton", "reference"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        chunk = {"grad_chunk_bytes": 1 << 20} if impl == "triton" else {}
        logp, ent = linear_logprob(hh, ww, t, entropy=True, impl=impl, vocab_size=vocab, **chunk)
        (logp.sum() + 0.1 * ent.sum()).backward()
        results[impl] = (logp.detach(), ent.detach(), hh.grad.float(), ww.grad.float())
    tri, ref = results["triton"], results["reference"]
    torch.testing.assert_close(tri[0], ref[0], atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(tri[1], ref[1], atol=2e-4, rtol=1e-5)
    grad_tol = dict(atol=1e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri[2], ref[2], **grad_tol)
    torch.testing.assert_close(tri[3], ref[3], **grad_tol)
    assert (tri[0][::7] == 0).all()


# ------------------------------------------------------------------------------------ sampler
@pytest.fixture(scope="module")
def one_gpu_parallel():
    from megatron_rlp.training import parallel

    parallel.init_distributed()
    parallel.init_model_parallel(1, 1)
    parallel.set_seed(1234)
    yield
    parallel.destroy()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("preset_name", ["tiny", "tiny-hybrid"])
def test_sampler_bf16_matches_the_update_forward(one_gpu_parallel, monkeypatch, spec, preset_name):
    from megatron_rlp.kernels import linear_logprob
    from megatron_rlp.models import builder
    from megatron_rlp.models.init import initialize_layout_invariant
    from megatron_rlp.models.presets import get_preset
    from megatron_rlp.rlp.step import build_update_sequences, output_weight
    from megatron_rlp.sampling import sample_thoughts
    from megatron_rlp.sampling.pipeline import StageInfo
    from megatron_rlp.sampling.sampler import model_traits

    if spec == "local":
        monkeypatch.setattr(builder, "transformer_engine_available", lambda: False)
    preset = get_preset(preset_name)
    model = builder.build_model(preset, builder.transformer_config(preset, params_dtype=torch.bfloat16))
    initialize_layout_invariant(model, 7, preset.num_layers)
    assert next(model.parameters()).is_cuda
    _, has_mamba, tree_ok = model_traits(model, StageInfo.current())
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 500, (n,), generator=gen).cuda() for n in (40, 33)]
    positions = [[19, 31], [12]]  # align 31: G=4 query tokens against 4k keys in the tree layout
    layouts = ["auto", "rows", "cascade"] + (["tree"] if tree_ok and not has_mamba else [])
    for layout in layouts:
        batch = sample_thoughts(model, docs, positions, num_thoughts=4, max_thought_len=6, open_id=501,
                                close_id=502, eod_id=500, temperature=1.0, seed=3, max_sequence_length=128,
                                layout=layout, vocab_size=503)
        assert batch.tokens.is_cuda and int(batch.tokens.max()) < 503
        if layout == "auto" and not tree_ok:
            assert batch.stats["layout"] == "cascade"
        closed, closed_len = batch.closed_tokens(500)
        seqs = build_update_sequences([d.cpu() for d in docs], batch.doc_index.cpu(), batch.position.cpu(),
                                      closed.cpu(), closed_len.cpu(), batch.forced.cpu(), 501, 500)
        model.return_hidden = True
        try:
            with torch.no_grad():
                tok = seqs["tokens"].cuda()
                hidden = model(tok, seqs["position_ids"].cuda(), None).transpose(0, 1)
        finally:
            model.return_hidden = False
        slots = seqs["thought_slot"].cuda()
        labels = seqs["labels"].cuda().gather(1, slots.clamp(min=0))
        rows = hidden.gather(1, slots.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
        with torch.no_grad():
            train = linear_logprob(rows.reshape(-1, rows.shape[-1]), output_weight(model), labels.reshape(-1),
                                   vocab_size=503).view(slots.shape)
        length = batch.max_thought_len
        mask = batch.mask.reshape(-1, length)
        gap = (batch.logprobs.reshape(-1, length) - train[:, :length]).abs() * mask
        assert gap.max() < BF16_DRIFT, f"{layout}: sampler/update log-prob gap {gap.max():.3g}"


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("preset_name", ["tiny", "tiny-hybrid"])
def test_cascade_cuda_graphs_match_eager(one_gpu_parallel, monkeypatch, spec, preset_name):
    """The cascade decode step captured as CUDA graphs (one per micro-batch shape, rows leaving
    the batch) draws the same tokens as the same step run eagerly."""
    from megatron_rlp.models import builder
    from megatron_rlp.models.init import initialize_layout_invariant
    from megatron_rlp.models.presets import get_preset
    from megatron_rlp.sampling import sample_thoughts

    if spec == "local":
        monkeypatch.setattr(builder, "transformer_engine_available", lambda: False)
    preset = get_preset(preset_name)
    model = builder.build_model(preset, builder.transformer_config(preset, params_dtype=torch.bfloat16))
    initialize_layout_invariant(model, 7, preset.num_layers)
    gen = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 500, (n,), generator=gen).cuda() for n in (60, 41, 52)]
    positions = [[19, 40, 55], [12], [33, 50]]
    kw = dict(num_thoughts=4, max_thought_len=12, open_id=5, close_id=6, eod_id=7, temperature=2.0,
              seed=3, max_sequence_length=128, layout="cascade", vocab_size=8)  # rows stop early
    eager = sample_thoughts(model, docs, positions, cuda_graphs=False, **kw)
    graphs = sample_thoughts(model, docs, positions, cuda_graphs=True, **kw)
    assert graphs.stats["cuda_graph_replays"] > 0 and eager.stats["cuda_graph_replays"] == 0
    assert graphs.stats["decode_row_steps"] < eager.stats["rows"] * 12  # rows left the batch
    assert torch.equal(graphs.tokens, eager.tokens) and torch.equal(graphs.lengths, eager.lengths)
    torch.testing.assert_close(graphs.logprobs, eager.logprobs, atol=1e-3, rtol=0)


def test_cascade_decode_syncs_the_host_once_per_step(one_gpu_parallel):
    """torch's sync debug mode warns at every host sync; counted differentially (12 against 6
    decode steps, no row stops early), the decode loop syncs once per step."""
    import warnings

    from megatron_rlp.models import builder
    from megatron_rlp.models.init import initialize_layout_invariant
    from megatron_rlp.models.presets import get_preset
    from megatron_rlp.sampling import sample_thoughts

    preset = get_preset("tiny")
    model = builder.build_model(preset, builder.transformer_config(preset, params_dtype=torch.bfloat16))
    initialize_layout_invariant(model, 7, preset.num_layers)
    docs = [torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(4)).cuda() for n in (40, 33)]
    counts = {}
    for length in (6, 12):
        kw = dict(num_thoughts=4, max_thought_len=length, open_id=501, close_id=502, eod_id=None,
                  temperature=0.0, seed=3, max_sequence_length=128, layout="cascade", vocab_size=503)
        sample_thoughts(model, docs, [[19, 31], [12]], **kw)  # warm: graphs, allocator
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                batch = sample_thoughts(model, docs, [[19, 31], [12]], **kw)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert (batch.lengths == length).all()
        counts[length] = sum("synchroniz" in str(w.message) for w in caught)
    assert counts[12] - counts[6] <= 6, counts


def test_cascade_flash_attention_matches_the_torch_path():
    """The two partial attentions through flash-attention (with their log-sum-exps) against the
    torch path, per-context lengths and a step limit, bf16, grouped-query heads."""
    from megatron_rlp.sampling import cascade

    if cascade._flash_kvcache() is None:
        pytest.skip("flash_attn does not import here")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(3, 4, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(3, 50, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    lengths = torch.tensor([50, 17, 33], device="cuda")
    limit = torch.arange(50, device="cuda") < 9
    for keys in (lengths, limit):
        flash = cascade.partial_attention(q, k, v, keys, 0.125)
        torch_path = cascade.partial_attention(q.float(), k.float(), v.float(), keys, 0.125)
        torch.testing.assert_close(flash[0].float(), torch_path[0], atol=2e-2, rtol=0)
        torch.testing.assert_close(flash[1].float(), torch_path[1], atol=2e-2, rtol=0)


# ------------------------------------------------------------------- one iteration, one GPU
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("preset_name", ["tiny", "tiny-hybrid"])
def test_next_token_and_rlp_iteration_on_one_gpu(corpus, preset_name, spec):
    """A fresh process: its default group is NCCL (one rank), as in a user's single-GPU run."""
    result = _run([sys.executable, RUNNER, "--preset", preset_name, "--spec", spec,
                   "--objectives", "ntp,rlp", "--data", corpus])
    assert sorted(result["history"]) == ["ntp", "rlp"]
    _check_iterations(result, spec)


def test_nccl_rejects_host_tensors():
    """The environment really discriminates: a one-rank NCCL group refuses a CPU tensor (the
    class of item 1's defects), and takes a CUDA one."""
    code = (
        "import os, torch, torch.distributed as dist\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ.get('PORT', '29533'))\n"
        "torch.cuda.set_device(0)\n"
        "dist.init_process_group('nccl', rank=0, world_size=1)\n"
        "x = torch.ones(2, device='cuda'); dist.all_reduce(x); torch.cuda.synchronize()\n"
        "try:\n"
        "    dist.all_reduce(torch.ones(2)); torch.cuda.synchronize(); print('HOST=accepted')\n"
        "except Exception as e:\n"
        "    print('HOST=rejected', type(e).__name__, str(e).splitlines()[0][:200])\n"
        "dist.destroy_process_group()\n"
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**_env(), "PORT": str(port)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HOST=rejected" in out.stdout, out.stdout


# ------------------------------------------------------------------------------- two GPUs
@pytest.mark.cuda(gpus=2)
@pytest.mark.parametrize("preset_name,tp,pp", [("tiny", 2, 1), ("tiny", 1, 2), ("tiny-hybrid", 2, 1)])
def test_rlp_iteration_on_two_gpus(corpus, preset_name, tp, pp):
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   RUNNER, "--preset", preset_name, "--spec", "local", "--objectives", "rlp",
                   "--tp", str(tp), "--pp", str(pp), "--data", corpus])
    _check_iterations(result, "local", world=2)
