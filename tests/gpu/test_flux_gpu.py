"""On a GPU: the native Flux DiT and the whole pipeline against diffusers (run on the GPU machines)."""

import asyncio

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from services.cli import build_in_process_router
from services.denoiser.weights import load_native_transformer
from services.runtime.config import GenerateRequest, StageConfig
from services.runtime.registry import ModelDir

CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_module_matches_diffusers_on_gpu(flux_dev_dir, dtype, tol):
    ref = FluxTransformer2DModel.from_pretrained(flux_dev_dir / "transformer", torch_dtype=dtype).to(CUDA).eval()
    native = load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=dtype, device=CUDA)
    g = torch.Generator(CUDA).manual_seed(0)
    x = torch.randn(2, 96, 16, generator=g, device=CUDA, dtype=dtype)
    ctx = torch.randn(2, 40, 32, generator=g, device=CUDA, dtype=dtype)
    pooled = torch.randn(2, 32, generator=g, device=CUDA, dtype=dtype)
    t = torch.tensor([0.9, 0.2], device=CUDA)
    guidance = torch.full((2,), 3.5, device=CUDA)
    img_ids = torch.stack([torch.zeros(96), torch.arange(96) // 12, torch.arange(96) % 12], dim=1).to(CUDA)
    txt_ids = torch.zeros(40, 3, device=CUDA)
    with torch.no_grad():
        expected = ref(x, ctx, pooled, t, img_ids, txt_ids, guidance, return_dict=False)[0].float()
        got = native(x, ctx, pooled, t, native.rope(txt_ids, img_ids), guidance).float()
    assert ((got - expected).norm() / expected.norm()).item() <= tol


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pipeline_pixels_match_diffusers_on_gpu(flux_dev_dir, dtype):
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cuda", dtype=dtype))
    pipe = FluxPipeline.from_pretrained(flux_dev_dir, torch_dtype=getattr(torch, dtype)).to(CUDA)
    kwargs = dict(prompt="a red circle", height=64, width=96, num_inference_steps=4, guidance_scale=3.5)
    got = asyncio.run(router.generate(GenerateRequest(seed=3, **kwargs))).images[0].pixels.astype(int)
    expected = pipe(generator=[torch.Generator("cpu").manual_seed(3)], output_type="np", **kwargs).images[0]
    expected = (expected * 255).round().astype(int)
    diff = np.abs(got - expected)
    if dtype == "float32":
        assert diff.max() <= 1
    else:
        # bf16 attention kernels differ between cuDNN (ours) and flash (diffusers' default pick).
        assert diff.mean() < 2.0, diff.mean()


def _step_inputs(native, batch=2, tokens=96, text=40):
    g = torch.Generator(CUDA).manual_seed(0)
    cfg = native.config
    x = torch.randn(batch, tokens, cfg.in_channels, generator=g, device=CUDA)
    ctx = torch.randn(batch, text, cfg.joint_attention_dim, generator=g, device=CUDA)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g, device=CUDA)
    # Values whose x1000 is exact in bf16 (as the model scales them), so bf16 and fp32 runs see the
    # same timestep and guidance embeddings; otherwise the rounding alone changes the output.
    t, guidance = torch.tensor([0.5, 0.25], device=CUDA), torch.full((batch,), 4.0, device=CUDA)
    img_ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // 12, torch.arange(tokens) % 12], 1).to(CUDA)
    rope = native.rope(torch.zeros(text, 3, device=CUDA), img_ids)
    return x, ctx, pooled, t, rope, guidance


def _run(model, inputs, dtype):
    x, ctx, pooled, t, rope, guidance = inputs
    with torch.inference_mode():
        return model(x.to(dtype), ctx.to(dtype), pooled.to(dtype), t, rope, guidance).float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_compiled_bf16_and_fp8_against_fp32_reference(flux_dev_dir):
    """The service's fast paths (compiled blocks with the GELU epilogue and split proj_out; fp8
    linears) against the fp32 reference on the same weights. "Within bf16 rounding" is measured,
    not assumed: diffusers' own bf16 forward on the same inputs sets the yardstick."""
    from services.denoiser.compile import compile_blocks
    from services.denoiser.quant import apply_precision

    reference = load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=torch.float32, device=CUDA)
    inputs = _step_inputs(reference)
    expected = _run(reference, inputs, torch.float32)
    ref_bf16 = FluxTransformer2DModel.from_pretrained(flux_dev_dir / "transformer", torch_dtype=torch.bfloat16)
    x, ctx, pooled, t, _, guidance = inputs
    img_ids = torch.stack([torch.zeros(96), torch.arange(96) // 12, torch.arange(96) % 12], 1).to(CUDA)
    with torch.inference_mode():
        theirs = ref_bf16.to(CUDA)(x.bfloat16(), ctx.bfloat16(), pooled.bfloat16(), t, img_ids,
                                   torch.zeros(40, 3, device=CUDA), guidance, return_dict=False)[0].float()
    yardstick = _rel(theirs, expected)
    bf16 = load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=torch.bfloat16, device=CUDA)
    compile_blocks(bf16)
    assert _rel(_run(bf16, inputs, torch.bfloat16), expected) <= 1.25 * yardstick + 1e-3
    fp8 = apply_precision(load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=torch.bfloat16, device=CUDA),
                          "fp8")
    compile_blocks(fp8)
    assert _rel(_run(fp8, inputs, torch.bfloat16), expected) <= 0.1


@pytest.mark.parametrize("rows,cols,stride", [(4608, 12288, 12288), (7, 3072, 3072), (5, 1000, 1000),
                                             (33, 3072, 5120)])  # the last: a slice of a wider output
def test_fused_gelu_quantize_rows_matches_eager(rows, cols, stride):
    """gelu_fp8.py's one-pass kernel against the eager arithmetic it replaces,
    quantize_rows(F.gelu(y, "tanh")): the same row scales, and the same e4m3 values except
    where the tanh implementations' last bit moves a value across an fp8 rounding boundary."""
    import torch.nn.functional as F

    from services.denoiser.gelu_fp8 import gelu_quantize_rows
    from services.denoiser.quant import quantize_rows

    g = torch.Generator(CUDA).manual_seed(0)
    wide = (torch.randn(rows, stride, generator=g, device=CUDA) * 3).bfloat16()
    wide[0, :4] = torch.tensor([0.0, -30.0, 30.0, 1e-6])
    y = wide[:, :cols]
    q, scale = gelu_quantize_rows(y)
    ref_q, ref_scale = quantize_rows(F.gelu(y, approximate="tanh"))
    assert q.dtype == ref_q.dtype and q.shape == (rows, cols) and scale.shape == (rows, 1)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    differ = q.float() != ref_q.float()
    assert differ.float().mean().item() < 1e-3
    # where they differ, by one e4m3 step at most (1/8 of the value, or 2^-9 of the scale below 2^-6)
    step = torch.maximum(ref_q.float().abs() / 8, torch.full_like(ref_scale, 2**-9))
    assert ((q.float() - ref_q.float()).abs() <= step * 1.001).all()
    compiled = torch.compile(gelu_quantize_rows, fullgraph=True)(y)  # an opaque op to dynamo: traces whole
    assert torch.equal(compiled[0].float(), q.float()) and torch.equal(compiled[1], scale)


@pytest.mark.parametrize("rows", [1, 32, 33, 255, 256, 4608])
@pytest.mark.parametrize("n,k", [(3072, 12288), (12288, 3072)])
def test_fp8_linear_with_a_bias_at_any_row_count(rows, n, k):
    """fp8_linear with a bias: cuBLASLt has no row-wise-scaled algorithm with a fused bias for a
    few rows into [12288 -> 3072] (it failed Qwen-Image's fp8 step on a 32-token negative
    prompt), so the bias is fused from FUSED_BIAS_ROWS rows on; either way the result is the
    dequantised product plus the bias."""
    from services.denoiser.quant import fp8_linear, quantize_linear_, quantize_rows

    g = torch.Generator(CUDA).manual_seed(rows)
    layer = torch.nn.Linear(k, n, device=CUDA, dtype=torch.bfloat16).requires_grad_(False)
    layer.bias.normal_(generator=g)
    quantize_linear_(layer)
    x = torch.randn(rows, k, generator=g, device=CUDA, dtype=torch.bfloat16)
    got = fp8_linear(x, layer.weight, layer.weight_scale, torch.bfloat16, layer.bias)
    xq, xs = quantize_rows(x)
    expected = (xq.float() * xs) @ (layer.weight.float() * layer.weight_scale.t()).t() + layer.bias.float()
    assert got.shape == (rows, n) and _rel(got, expected) < 1e-2


@pytest.mark.parametrize("prefetch", [1, 2])
def test_layerwise_offload_equals_resident_on_cuda(flux_dev_dir, prefetch):
    """The side-stream copies and their events: offloaded steps give the resident model's output
    bit for bit, step after step (the prefetch wraps from the last block into the next step)."""
    from services.denoiser.compile import compile_blocks
    from services.denoiser.offload import enable_layerwise_offload

    resident = load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=torch.bfloat16, device=CUDA)
    offloaded = load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=torch.bfloat16,
                                        device=torch.device("cpu"))
    offload = enable_layerwise_offload(offloaded, CUDA, prefetch)
    compile_blocks(resident)
    compile_blocks(offloaded)
    inputs = _step_inputs(resident)
    expected = _run(resident, inputs, torch.bfloat16)
    assert offloaded.transformer_blocks[0].attn.to_q.weight.device.type == "cpu"  # at rest: host memory
    for _ in range(4):
        assert torch.equal(_run(offloaded, inputs, torch.bfloat16), expected)
    assert offload.device_bytes < sum(p.numel() * p.element_size() for p in resident.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_with_lse_matches_sdpa_on_cuda(dtype):
    """The ring's per-block kernel (cuDNN on Hopper, else flash): output equals SDPA and the
    log-sum-exp equals the one computed in fp32, on an uneven sequence length."""
    from services.denoiser.attention import attention_with_lse

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1153, 24, 128, generator=g, device="cuda", dtype=dtype) for _ in range(3))
    out, lse = attention_with_lse(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    scores = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) / 128**0.5
    assert lse.shape == (2, 24, 1153) and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=2e-2, rtol=1e-3)


def test_cuda_graph_forwards_equal_plain_ones(flux_dev_dir):
    """The runner's CUDA graphs replay the compiled forward exactly: same outputs as the plain
    runner step after step, for new prompts of the same shape (new static inputs, same graph),
    with and without CFG, and a new graph for a new size."""
    from services.denoiser.compile import compile_blocks
    from services.denoiser.latents import PackedLatents2x2
    from services.denoiser.runner import DenoiserRunner
    from services.runtime.messages import Conditioning

    model = load_native_transformer(ModelDir(flux_dev_dir), "flux", dtype=torch.bfloat16, device=CUDA)
    compile_blocks(model)
    cfg = model.config
    layout = PackedLatents2x2(cfg.in_channels // 4, vae_scale_factor=8)
    plain = DenoiserRunner(model, layout, CUDA, torch.bfloat16)
    graphed = DenoiserRunner(model, layout, CUDA, torch.bfloat16, cuda_graphs=True)
    g = torch.Generator(CUDA).manual_seed(0)

    def cond():
        return Conditioning(torch.randn(1, 40, cfg.joint_attention_dim, generator=g, device=CUDA),
                            torch.randn(1, cfg.pooled_projection_dim, generator=g, device=CUDA))

    for grid, negative in [((16, 24), False), ((16, 24), True), ((16, 24), False), ((16, 16), False)]:
        pos, neg = cond(), cond() if negative else None
        ins = [r.prepare(pos, neg, 3.5, 2, grid) for r in (plain, graphed)]
        for t in (0.9, 0.4):
            x = torch.randn(2, grid[0] * grid[1] // 4, cfg.in_channels, generator=g, device=CUDA)
            timestep = torch.full((2,), t, device=CUDA)
            expected = plain.predict(x, timestep, ins[0])
            got = graphed.predict(x, timestep, ins[1])
            assert len(got) == len(expected) == (2 if negative else 1)
            for a, b in zip(got, expected):
                assert torch.equal(a, b)
    assert graphed.graphs.captures == 2  # one per size: prompts and CFG branches reuse it


@pytest.mark.parametrize("parallel", [{}, {"precision": "fp8"}, {"ulysses_degree": 2},
                                      {"precision": "fp8", "ulysses_degree": 2},
                                      {"ulysses_degree": 2, "ulysses_exchange": "copy-engine"}],
                         ids=["1gpu", "fp8", "ulysses2", "fp8_ulysses2", "ulysses2_copy_engine"])
def test_requests_with_cuda_graphs_give_the_same_pixels(flux_dev_dir, parallel):
    """Whole requests through the service with and without CUDA graphs (compiled either way):
    the same pixels on one GPU (bf16 and fp8, whose default is graphs on). On a two-rank replica
    (graphs on by default too) a replayed forward packs q and k with qk_norm.ulysses_pack's
    kernel where the plain one has inductor's, whose sums of squares round a rare value the
    other way (SequenceParallel.for_graphs): the same pixels within that rounding (bf16 and fp8
    passed on 2x H200, session 13; bf16 with the copy-engine exchange, session 14)."""
    if torch.cuda.device_count() < parallel.get("ulysses_degree", 1):
        pytest.skip("needs 2 GPUs")
    kwargs = dict(prompt="a red circle", height=64, width=96, num_inference_steps=3, guidance_scale=3.5, seed=5)
    from services.denoiser.parallel import copy_exchange

    pixels = []
    for graphs in (False, True):
        fresh = not copy_exchange.set_up_here()  # else the replica uses NCCL (an earlier test set one up)
        router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cuda", dtype="bfloat16"),
                                         denoiser_options={**parallel, "cuda_graphs": graphs})
        try:
            image = asyncio.run(router.generate(GenerateRequest(**kwargs))).images[0]
            pixels.append(image.pixels.astype(np.int16))
            # Graphed for real: a capture that fails falls back to plain forwards with a warning,
            # and these pixels would then compare plain with plain (the NCCL Ulysses path did).
            stage = getattr(router.denoiser.stage, "stage", router.denoiser.stage)  # rank 0's of a group
            assert (stage.runner.graphs is not None and stage.runner.graphs.captures > 0) == graphs
            if graphs and "ulysses_exchange" in parallel:
                assert _posts_by_copy(router.denoiser.stage) == fresh  # not NCCL after a failed set-up
        finally:
            if hasattr(router.denoiser.stage, "close"):  # a multi-rank group's processes
                router.denoiser.stage.close()
    diff = np.abs(pixels[0] - pixels[1])
    if "ulysses_degree" not in parallel:
        assert not diff.any()
    else:
        # fp8's per-token activation scales carry a changed q / k value further (H200: mean 0.70, max 7)
        bound = 2.0 if parallel.get("precision") == "fp8" else 0.5
        assert pixels[0].std() > 5 and diff.mean() < bound and diff.max() <= 16, (diff.mean(), diff.max())


@pytest.mark.parametrize("options", [{"cuda_graphs": False}, {"cuda_graphs": True},
                                     {"cuda_graphs": True, "ulysses_exchange": "copy-engine"}],
                         ids=["plain", "cuda_graphs", "cuda_graphs_copy_engine"])
def test_dead_rank_under_nccl_fails_the_request_and_the_replica_is_rebuilt(flux_dev_dir, options):
    """tests/cpu/test_parallel_e2e.py's dead-rank test on NCCL: a follower killed mid-request
    fails that request with StageUnavailableError within seconds (rank 0's death watch aborts the
    communicators its kernels spin on, graph-captured ones included), the next one rebuilds the
    replica, and the one after is served."""
    import time

    from services.runtime.errors import StageUnavailableError

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from services.denoiser.parallel import copy_exchange

    small = dict(prompt="a red circle", height=64, width=96, num_inference_steps=3, seed=5)
    fresh = not copy_exchange.set_up_here()  # else a copy-engine replica uses NCCL (an earlier test set one up)
    router = build_in_process_router(StageConfig(model_path=flux_dev_dir, device="cuda", dtype="bfloat16"),
                                     denoiser_options={"ulysses_degree": 2, **options})
    group = router.denoiser.stage
    try:
        expected = asyncio.run(router.generate(GenerateRequest(**small))).images[0].pixels
        graphs = group.stage.runner.graphs  # rank 0's: graphed for real, where asked (not a fallback)
        assert (graphs is not None and graphs.captures > 0) == options["cuda_graphs"]
        assert _posts_by_copy(group) == (options.get("ulysses_exchange") == "copy-engine" and fresh)

        # Kill rank 1 from rank 0's step callback, at step 5 of 1000: a sleep-timed kill missed
        # the request on H200, where 1000 graph-replayed steps of this tiny model took under 1 s.
        denoise = group.denoise

        def denoise_killing_rank_1(request, on_step=None):
            def step(i, n):
                if i == 5:
                    group.ranks.kill_rank(1)
                if on_step is not None:
                    on_step(i, n)
            return denoise(request, step)

        async def long_request_with_kill():
            group.denoise = denoise_killing_rank_1
            try:
                await router.generate(GenerateRequest(**{**small, "num_inference_steps": 1000}))
            except Exception as exc:
                return exc
            finally:
                group.denoise = denoise

        t0 = time.monotonic()
        failure = asyncio.run(long_request_with_kill())
        assert isinstance(failure, StageUnavailableError), failure
        assert time.monotonic() - t0 < 30
        with pytest.raises(StageUnavailableError, match="restarted"):
            asyncio.run(router.generate(GenerateRequest(**small)))
        assert np.array_equal(asyncio.run(router.generate(GenerateRequest(**small))).images[0].pixels, expected)
        # a replica rebuilt in this process exchanges through NCCL (copy_exchange.set_up_here)
        assert group.config.ulysses_exchange == "nccl" and not _posts_by_copy(group)
    finally:
        group.close()


def _posts_by_copy(group) -> bool:
    """Whether a multi-rank replica's rank 0 runs its Ulysses exchanges by copy engine."""
    from services.denoiser.parallel import copy_exchange

    return copy_exchange.posts_by_copy(group.stage.runner.mesh.group("ulysses").group_name)


def test_an_idle_nccl_replica_outlives_its_collective_timeout():
    """The CPU test's idle replica on NCCL: its followers wait on the gloo control group, not on
    an NCCL collective whose watchdog would end them."""
    from tests.cpu.test_parallel_e2e import test_an_idle_replica_outlives_its_collective_timeout

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    test_an_idle_replica_outlives_its_collective_timeout(device="cuda")


def test_fp8_attention_kernel_against_its_emulation_exact_attention_and_a_graph():
    """cuDNN's fp8 kernel (services/denoiser/attention_fp8.py): its O is within a few fp8 steps
    of the CPU emulation on the same quantised inputs, within fp8 error of exact attention, and
    the same when captured in a CUDA graph and when compiled."""
    import torch.nn.functional as F

    from services.denoiser.attention_fp8 import _quantise, fp8_attention, unavailable_reason

    device = torch.device("cuda")
    if reason := unavailable_reason(device, 128):
        pytest.skip(reason)
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(2, 1000, 4, 128, generator=g, device=device, dtype=torch.bfloat16) * s for s in (1, 1, 1))
    out = fp8_attention(q, k, v)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert 0.005 < err < 0.08, err
    quantised = [x for t in (q, k, v) for x in _quantise(t)]
    args = (*quantised[0::2], *quantised[1::2], 1.0 / quantised[5])
    o_gpu = torch.ops.ditserve.sdpa_fp8(*args).float().cpu()
    o_cpu = torch.ops.ditserve.sdpa_fp8(*(t.cpu() for t in args)).float()
    assert ((o_gpu - o_cpu).norm() / o_cpu.norm()).item() < 0.05  # H200: 0.034
    assert torch.equal(fp8_attention(q[1:], k[1:], v[1:])[0], out[1])  # per-sample scales
    compiled = torch.compile(fp8_attention, fullgraph=True)
    assert ((compiled(q, k, v).float() - out.float()).norm() / out.float().norm()).item() < 0.01
    graph, static = torch.cuda.CUDAGraph(), [t.clone() for t in (q, k, v)]
    fp8_attention(*static)  # the plan exists before the capture
    with torch.cuda.graph(graph):
        captured = fp8_attention(*static)
    for t, s in zip((q, k, v), static):
        s.copy_(t.flip(1))
    graph.replay()
    assert torch.equal(captured, fp8_attention(q.flip(1), k.flip(1), v.flip(1)))


@pytest.mark.parametrize("parallel", [{}, {"ulysses_degree": 2}], ids=["1gpu", "ulysses2"])
def test_requests_with_fp8_attention(flux_dev_dir_d128, parallel):
    """A whole fp8 request with fp8 attention (compiled, graphs on as fp8's default) against the
    same without: close, not equal; through Ulysses too (each rank scales its own heads)."""
    from services.denoiser.attention_fp8 import unavailable_reason

    if torch.cuda.device_count() < parallel.get("ulysses_degree", 1):
        pytest.skip("needs 2 GPUs")
    if reason := unavailable_reason(torch.device("cuda"), 128):
        pytest.skip(reason)
    kwargs = dict(prompt="a red circle", height=64, width=96, num_inference_steps=3, guidance_scale=3.5, seed=5)
    pixels = []
    for attention in ("default", "fp8"):
        router = build_in_process_router(StageConfig(model_path=flux_dev_dir_d128, device="cuda", dtype="bfloat16"),
                                         denoiser_options={**parallel, "precision": "fp8",
                                                           "attention_precision": attention})
        try:
            pixels.append(asyncio.run(router.generate(GenerateRequest(**kwargs))).images[0].pixels.astype(int))
        finally:
            if hasattr(router.denoiser.stage, "close"):
                router.denoiser.stage.close()
    diff = np.abs(pixels[0] - pixels[1]).mean()
    assert 0 < diff < 4, diff


@pytest.mark.parametrize("out", ["bf16", "fp8"])
@pytest.mark.parametrize("split", [0, 512], ids=["single_block", "joint"])
def test_rms_norm_rope_kernel_matches_its_reference(split, out):
    """qk_norm.py's Triton kernel against the eager ops it replaces, on strided views (q inside a
    fused QKV output), a head count that is no multiple of its block, a token count that is no
    multiple of its tokens per program, and a joint sequence read from two tensors with the
    text's own norm weights: equal but for the rare value that the sum of squares' order moves
    across a rounding boundary; compiled and in a CUDA graph the same."""
    from services.denoiser.attention import rms_norm_bound
    from services.denoiser.models.flux import rope_tables
    from services.denoiser.qk_norm import _reference, rms_norm_rope

    device = torch.device("cuda")
    g = torch.Generator(device).manual_seed(0)
    b, s, h, d = 2, 1509, 5, 128
    fused_qkv = torch.randn(b, s, 3 * h, d, generator=g, device=device, dtype=torch.bfloat16) * 3
    fused_txt = torch.randn(b, split, 3 * h, d, generator=g, device=device, dtype=torch.bfloat16) * 3
    image, text = fused_qkv[:, :, h : 2 * h], fused_txt[:, :, h : 2 * h]
    norms = [torch.nn.RMSNorm(d, eps=1e-6, device=device, dtype=torch.bfloat16).requires_grad_(False)
             for _ in range(2)]
    for n in norms:
        n.weight.data = torch.rand(d, generator=g, device=device).to(torch.bfloat16) * 2
    ids = torch.stack([torch.zeros(split + s), torch.arange(split + s) // 40, torch.arange(split + s) % 40], dim=1)
    cos, sin = rope_tables(ids.to(device), (16, 56, 56))
    bound = rms_norm_bound(*norms) if out == "fp8" else None
    args = (text, image, norms[0].weight, norms[1].weight, cos, sin, 1e-6, bound)
    got, ref = rms_norm_rope(*args), _reference(*args)
    assert got.dtype == ref.dtype and got.shape == ref.shape == (b, split + s, h, d) and got.is_contiguous()
    bits = (lambda t: t.view(torch.uint8)) if out == "fp8" else (lambda t: t.view(torch.int16))
    differ = bits(got) != bits(ref)
    assert differ.float().mean() < 0.02, differ.float().mean()
    # one e4m3 (bf16) step, or a few bf16 roundings of the normalised pair before RoPE (where its
    # two terms nearly cancel, a large part of a small result)
    top = 448 if out == "fp8" else ref.float().abs().max().item()
    assert ((got.float() - ref.float()).abs() <= ref.float().abs() / 8 + top / 64).all()
    if out == "fp8":
        assert ref.float().abs().max() > 50  # the bound leaves the range in use
    _compiled_and_replayed_alike(rms_norm_rope, args, got, bits, (fused_qkv, fused_txt))


def _compiled_and_replayed_alike(op, args, got, bits, sources) -> None:
    """op(*args) compiled gives `got`; captured in a CUDA graph, a replay after its `sources`
    changed in place gives what a fresh call gives (compared as `bits`)."""
    assert torch.equal(bits(torch.compile(op, fullgraph=True)(*args)), bits(got))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op(*args)
    for source in sources:
        source.mul_(-1)
    graph.replay()
    assert torch.equal(bits(captured), bits(op(*args)))


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("split", [0, 512], ids=["single_block", "joint"])
def test_ulysses_pack_kernel_matches_its_reference(split, ranks):
    """qk_norm.ulysses_pack's kernel writes a Ulysses send buffer: q and k normalised and rotated
    as rms_norm_rope's kernel does them, v copied bit for bit, every head in its rank's slot;
    against the eager reference (the layout ulysses.py packs by hand), on strided projections,
    compiled and in a CUDA graph the same."""
    from services.denoiser.models.flux import rope_tables
    from services.denoiser.qk_norm import _ulysses_pack, ulysses_pack

    device = torch.device("cuda")
    g = torch.Generator(device).manual_seed(0)
    b, s, h, d = 2, 1509, 12, 128
    fused_img = torch.randn(b, s, 3 * h, d, generator=g, device=device, dtype=torch.bfloat16) * 3
    fused_txt = torch.randn(b, split, 3 * h, d, generator=g, device=device, dtype=torch.bfloat16) * 3
    q, k, v = ((fused_txt[:, :, i * h : (i + 1) * h], fused_img[:, :, i * h : (i + 1) * h]) for i in range(3))
    weights = [torch.rand(d, generator=g, device=device).to(torch.bfloat16) * 2 for _ in range(4)]
    ids = torch.stack([torch.zeros(split + s), torch.arange(split + s) // 40, torch.arange(split + s) % 40], dim=1)
    cos, sin = rope_tables(ids.to(device), (16, 56, 56))
    args = (q, k, v, tuple(weights[:2]), tuple(weights[2:]), cos, sin, 1e-6, ranks)
    got = ulysses_pack(*args)
    ref = _ulysses_pack(*(t.cpu() if isinstance(t, torch.Tensor) else t
                          for t in (*q, *k, *v, *weights, cos, sin, 1e-6, ranks))).to(device)
    assert got.shape == ref.shape == (ranks, split + s, b, 3, h // ranks, d)
    assert torch.equal(got[:, :, :, 2], ref[:, :, :, 2])  # v
    bits = got[:, :, :, :2].view(torch.int16) != ref[:, :, :, :2].view(torch.int16)
    assert bits.float().mean() < 0.02, bits.float().mean()
    top = ref.float().abs().max().item()
    assert ((got.float() - ref.float()).abs() <= ref.float().abs() / 8 + top / 64).all()
    _compiled_and_replayed_alike(ulysses_pack, args, got, lambda t: t.view(torch.int16), (fused_img, fused_txt))


def test_variable_text_ulysses_replica_serves_prompts_of_any_length(qwen_image_dir):
    """A compiled two-rank Qwen-Image replica (NCCL, CUDA graphs by default) whose exchanges run
    outside the compiled blocks (SequenceParallel's outside_graphs, as for every variable-text
    model): prompts of three lengths and a negative prompt of a fourth give the one-GPU pixels
    within bf16 rounding (the CPU suite counts the compiled graphs)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    prompts = ["a cat", "a red circle on a white background", "a large green triangle above a small blue square"]
    pixels = []
    for parallel in ({}, {"ulysses_degree": 2}):
        router = build_in_process_router(StageConfig(model_path=qwen_image_dir, device="cuda", dtype="bfloat16"),
                                         denoiser_options=parallel or None)
        try:
            pixels.append([asyncio.run(router.generate(GenerateRequest(
                prompt=p, negative_prompt="dark", true_cfg_scale=3.0, height=48, width=80, num_inference_steps=3,
                seed=5))).images[0].pixels.astype(np.int16) for p in prompts])
        finally:
            if hasattr(router.denoiser.stage, "close"):
                router.denoiser.stage.close()
    for one, two in zip(*pixels):
        assert one.std() > 5 and np.abs(one - two).mean() < 2, np.abs(one - two).mean()
