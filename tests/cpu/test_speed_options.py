"""The denoiser's speed options on CPU: fp8 linears, the cat-free / GELU-epilogue layer paths,
compile tracing (fullgraph), warm-up, and their flags. Speed itself is measured on GPUs
(benchmarks/dit_step.py); here the arithmetic and the plumbing are checked."""

import pytest
import torch

from services.cli import build_parser, main, serve_config_from_args
from services.denoiser.compile import compile_blocks
from services.denoiser.parallel.tp import RowParallelLinear
from services.denoiser.quant import FP8, apply_precision, quantize_rows
from services.denoiser.stage import DenoiserStage
from services.denoiser.weights import load_native_transformer
from services.encoder.stage import EncoderStage
from services.runtime.config import DenoiserConfig, StageConfig, VaeConfig
from services.runtime.registry import ModelDir
from services.vae.stage import VaeStage
from tests.cpu.test_flux_module import _inputs, _rel_err


def _native(path, dtype=torch.float32):
    return load_native_transformer(ModelDir(path), "flux", dtype=dtype, device=torch.device("cpu"))


def _forward(model, seed=0):
    x, ctx, pooled, t, guidance, img_ids, txt_ids = _inputs(model.config, 2, 6, 10, 13, seed)
    with torch.inference_mode():
        return model(x, ctx, pooled, t, model.rope(txt_ids, img_ids), guidance)


def test_quantize_rows_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different scale
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (64, 1)
    # e4m3 keeps 3 mantissa bits: per-element relative error <= 2^-4, whatever the row's scale,
    # down to the subnormals (below 2^-6 of the scale), where the step is a fixed 2^-9 of it.
    assert ((q.float() * scale - x).abs() <= torch.maximum(x.abs() * 2**-4, scale * 2**-10)).all()


def test_fp8_blocks_close_to_full_precision(flux_dev_dir):
    reference = _forward(_native(flux_dev_dir))
    fp8 = apply_precision(_native(flux_dev_dir), "fp8")
    linears = [m for b in fp8.transformer_blocks for m in b.modules() if hasattr(m, "weight_scale")]
    assert linears and all(m.weight.dtype == FP8 for m in linears)
    assert fp8.norm_out.linear.weight.dtype == torch.float32  # modulation stays in the model dtype
    err = _rel_err(_forward(fp8), reference)
    assert 0 < err < 0.05


def test_row_parallel_pieces_equal_concatenation():
    layer = RowParallelLinear(48, 16, blocks=[16, 32])
    a, b = torch.randn(3, 5, 16), torch.randn(3, 5, 32)
    torch.testing.assert_close(layer.forward_pieces([a, b]), layer(torch.cat([a, b], dim=-1)), rtol=1e-6, atol=1e-6)


def test_pending_gelu_pieces_equal_the_applied_gelu():
    """An fp8 down-projection given its input's GELU still to apply (a PendingGelu: on CUDA the
    GELU and the quantisation run as one kernel, gelu_fp8.py) gives what it gives for the GELU
    applied first; on CPU that is the same arithmetic, so exactly."""
    from services.denoiser.gelu_fp8 import PendingGelu
    from services.denoiser.parallel.tp import ColumnParallelLinear
    from services.denoiser.quant import quantize_linear_

    torch.manual_seed(0)
    layer = RowParallelLinear(48, 16, blocks=[16, 32])
    quantize_linear_(layer)
    a, pre = torch.randn(3, 5, 16), torch.randn(3, 5, 32) * 3
    gelu = torch.nn.functional.gelu(pre, approximate="tanh")
    assert torch.equal(layer.forward_pieces([a, PendingGelu(pre)]), layer.forward_pieces([a, gelu]))
    down = RowParallelLinear(32, 16)
    quantize_linear_(down)
    assert torch.equal(down(PendingGelu(pre)), down(gelu))
    # Only fp8 layers on CUDA defer the GELU: on CPU forward_gelu(lazy=True) returns the tensor.
    up = ColumnParallelLinear(16, 32)
    quantize_linear_(up)
    assert isinstance(up.forward_gelu(a, lazy=True), torch.Tensor)


def test_blocks_trace_whole_for_compile(flux_dev_dir):
    """fullgraph=True: a graph break anywhere in a block (e.g. the attention dispatch) fails here,
    on CPU, instead of at the first request on a GPU."""
    model = _native(flux_dev_dir)
    expected = _forward(model)
    compile_blocks(model, backend="eager")
    torch.testing.assert_close(_forward(model), expected, rtol=0, atol=0)


def test_warmup_runs_each_resolution(flux_dev_dir, monkeypatch):
    seen = []
    original = DenoiserStage.denoise
    monkeypatch.setattr(DenoiserStage, "denoise", lambda self, req, on_step=None: seen.append(
        (req.height, req.width)) or original(self, req, on_step))
    DenoiserStage(DenoiserConfig(model_path=flux_dev_dir, device="cpu", warmup_resolutions=["64x32", "48x48"]))
    assert seen == [(32, 64), (48, 48)]


def test_encoder_and_vae_warm_up_at_start(flux_dev_dir, monkeypatch):
    """The encoder encodes once at start; the VAE decodes once per warm-up size, at that size's
    latent shape (the model's VAE scale factor is 8)."""
    encoded, decoded = [], []
    encode, decode = EncoderStage.encode, VaeStage.decode
    monkeypatch.setattr(EncoderStage, "encode", lambda self, req: encoded.append(req) or encode(self, req))
    monkeypatch.setattr(VaeStage, "decode", lambda self, req: decoded.append(tuple(req.latents.shape)) or decode(self, req))
    EncoderStage(StageConfig(model_path=flux_dev_dir, device="cpu"))
    assert [(r.prompts, r.max_sequence_length) for r in encoded] == [([""], 512)]
    vae = VaeStage(VaeConfig(model_path=flux_dev_dir, device="cpu", warmup_resolutions=["64x32", "48x48"]))
    channels = vae.vae.config.latent_channels
    assert decoded == [(1, channels, 4, 8), (1, channels, 6, 6)]


def test_warmup_resolution_must_fit_the_model(flux_dev_dir, capsys):
    rc = main(["generate", "--model-path", str(flux_dev_dir), "--prompt", "x", "--device", "cpu",
               "--warmup-resolutions", "40x40", "--no-progress", "-o", "/tmp/never.png"])
    assert rc == 2 and "warmup resolution 40x40: sides must be multiples of 16" in capsys.readouterr().err


def test_generate_fp8_end_to_end(flux_dev_dir, tmp_path, capsys):
    out = tmp_path / "fp8.png"
    rc = main(["generate", "--model-path", str(flux_dev_dir), "--prompt", "a red circle", "--device", "cpu",
               "--dit-precision", "fp8", "--height", "64", "--width", "64", "--num-inference-steps", "2",
               "--seed", "1", "--no-progress", "-o", str(out)])
    assert rc == 0 and out.stat().st_size > 0


def test_serve_flags_reach_the_denoiser_config(tmp_path):
    args = build_parser().parse_args(["serve", "--no-ray", "--dit-precision", "fp8", "--warmup-resolutions",
                                      "1024x1024", "768x1344", "--compile-cache-dir", str(tmp_path),
                                      "--dit-layerwise-offload", "--offload-prefetch", "2", "--ulysses-degree", "2"])
    denoiser = serve_config_from_args(args).stage_config("denoiser")
    assert (denoiser.precision, denoiser.warmup_resolutions, denoiser.compile_cache_dir) == (
        "fp8", ["1024x1024", "768x1344"], tmp_path)
    assert (denoiser.layerwise_offload, denoiser.offload_prefetch, denoiser.ulysses_degree) == (True, 2, 2)
    assert denoiser.compile is None  # not given: the device decides
    assert serve_config_from_args(args).stage_config("vae").warmup_resolutions == ["1024x1024", "768x1344"]


def test_worker_refuses_denoiser_flags_for_other_roles(capsys):
    assert main(["worker", "--role", "vae", "--dit-precision", "fp8"]) == 2
    assert "--dit-precision: denoiser options, not for --role vae" in capsys.readouterr().err


def test_cuda_graphs_option_defaults_and_limits():
    """--cuda-graphs reaches the denoiser config; unset, only a compiled multi-rank or fp8 CUDA
    replica captures graphs; with layerwise offload it is refused, and CPU replicas never capture."""
    import pydantic

    from services.denoiser.graphs import should_graph
    from services.denoiser.latents import PackedLatents2x2
    from services.denoiser.runner import DenoiserRunner

    args = build_parser().parse_args(["serve", "--no-ray", "--no-cuda-graphs", "--ulysses-degree", "2"])
    assert serve_config_from_args(args).stage_config("denoiser").cuda_graphs is False
    with pytest.raises(pydantic.ValidationError, match="cuda_graphs and layerwise_offload"):
        DenoiserConfig(model_path="m", cuda_graphs=True, layerwise_offload=True)

    cuda = torch.device("cuda")
    def graphs(multi_rank, **options):
        return should_graph(DenoiserConfig(model_path="m", **options), cuda, multi_rank)
    assert graphs(True) and not graphs(False) and graphs(False, cuda_graphs=True)
    assert graphs(False, precision="fp8") and not graphs(False, precision="fp8", compile=False)
    assert graphs(False, attention_precision="fp8")  # fp8 attention's per-call host work
    fp8 = DenoiserConfig(model_path="m", precision="fp8")
    assert not should_graph(fp8, cuda, False, variable_text=True)  # a graph per prompt length: off
    assert not graphs(True, compile=False) and not graphs(True, layerwise_offload=True)
    assert not graphs(True, cuda_graphs=False)
    assert not should_graph(DenoiserConfig(model_path="m", cuda_graphs=True), torch.device("cpu"), True)
    assert DenoiserRunner(torch.nn.Linear(1, 1), PackedLatents2x2(4, 8), torch.device("cpu"), torch.float32,
                          cuda_graphs=True).graphs is None


def test_a_forward_that_cannot_be_captured_runs_without_graphs(flux_dev_dir, caplog):
    """Graphs are on by default for some replicas; if a family's forward cannot be captured
    (only a CUDA capture can fail that way, so a stand-in raises graphs.py's CaptureError here)
    the runner says so once, drops its graphs and serves the plain forward's result."""
    import logging

    from services.denoiser.graphs import CaptureError
    from services.denoiser.latents import PackedLatents2x2
    from services.denoiser.runner import DenoiserRunner
    from services.runtime.messages import Conditioning

    class Uncapturable:
        cleared = False

        def run(self, fn, args, depends_on):
            raise CaptureError("operation not permitted when stream is capturing")

        def clear(self):
            self.cleared = True

    model = _native(flux_dev_dir)
    cfg, cpu = model.config, torch.device("cpu")
    runner = DenoiserRunner(model, PackedLatents2x2(cfg.in_channels // 4, vae_scale_factor=8), cpu, torch.float32)
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 12, cfg.joint_attention_dim, generator=g),
                        torch.randn(1, cfg.pooled_projection_dim, generator=g))
    inputs = runner.prepare(cond, None, 3.5, 1, (8, 8))
    x, t = torch.randn(1, 16, cfg.in_channels, generator=g), torch.full((1,), 0.5)
    expected = runner.predict(x, t, inputs)
    runner.graphs = stand_in = Uncapturable()
    with caplog.at_level(logging.WARNING, logger="services.denoiser.runner"):
        got = runner.predict(x, t, inputs)
    assert torch.equal(got[0], expected[0])
    assert runner.graphs is None and stand_in.cleared
    assert "CUDA graph capture of the FluxTransformer forward failed" in caplog.text


def test_modulations_are_precomputed_once_per_request(flux_dev_dir, monkeypatch):
    """Flux's AdaLN modulations come from a table made before the first step (one GEMM of the
    request's steps per layer, runner.precompute) rather than a GEMV per layer per step: the
    forward with a table row equals the plain one, and a request reads each modulation weight
    once per sample instead of once per step, for the same latents."""
    from services.runtime.messages import Conditioning, DenoiseRequest

    model = _native(flux_dev_dir)
    x, ctx, pooled, t, guidance, img_ids, txt_ids = _inputs(model.config, 2, 6, 10, 13, 0)
    with torch.inference_mode():
        rope = model.rope(txt_ids, img_ids)
        plain = model(x, ctx, pooled, t, rope, guidance)
        row = model.modulation_table(t, guidance, pooled, torch.float32)
        assert row.shape == (2, model.modulation_width)
        assert _rel_err(model(x, ctx, pooled, t, rope, guidance, modulations=row), plain) < 1e-6

    stage = DenoiserStage(DenoiserConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"))
    cfg = stage.runner.model.config
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(2, 7, cfg.joint_attention_dim, generator=g),
                        torch.randn(2, cfg.pooled_projection_dim, generator=g))
    request = DenoiseRequest(positive=cond, negative=None, height=32, width=48, num_inference_steps=5,
                             guidance_scale=3.5, true_cfg_scale=1.0, seeds=[1, 2])
    reads = []
    stage.runner.model.transformer_blocks[0].norm1.linear.register_forward_hook(lambda m, a, o: reads.append(len(a[0])))
    tabulated = stage.denoise(request).latents
    assert reads == [5, 5]  # a table of 5 steps per sample, before the steps; nothing during them
    reads.clear()
    monkeypatch.setattr(stage.runner, "precompute", lambda inputs, timesteps: None)
    stepwise = stage.denoise(request).latents
    assert reads == [2] * 5  # without: the batch's 2 rows, every step
    assert _rel_err(tabulated, stepwise) < 1e-5


def test_modulation_tables_under_mixed_lora_unless_an_adapter_updates_a_modulation(flux_dev_dir, monkeypatch):
    """A batch mixing LoRA sets (unmerged, per-sample updates) keeps its modulation tables when
    no adapter touches a layer the table runs, as fp8 replicas (always unmerged) need; an update
    on a modulation layer or an embedder (laid out by the batch's rows) sends that batch back to
    the per-step GEMVs."""
    from services.denoiser.lora.adapter import LoraAdapter, LoraWeight
    from services.runtime.messages import AdapterRef, Conditioning, DenoiseRequest

    stage = DenoiserStage(DenoiserConfig(model_path=flux_dev_dir, device="cpu", dtype="float32"))
    model = stage.runner.model

    def adapter(name, path, seed):
        m, g = model.get_submodule(path), torch.Generator().manual_seed(seed)
        return LoraAdapter(name, {path: LoraWeight(torch.randn(2, m.in_features, generator=g) * 0.1,
                                                   torch.randn(m.out_features, 2, generator=g) * 0.1)})

    adapters = {"q": adapter("q", "transformer_blocks.0.attn.to_q", 1),
                "k": adapter("k", "single_transformer_blocks.0.attn.to_k", 2),
                "mod": adapter("mod", "transformer_blocks.0.norm1.linear", 3),
                "temb": adapter("temb", "time_text_embed.timestep_embedder.linear_1", 4)}
    monkeypatch.setattr(stage.adapters, "get", lambda ref: adapters[ref.name])
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(2, 7, cfg.joint_attention_dim, generator=g),
                        torch.randn(2, cfg.pooled_projection_dim, generator=g))
    reads = []
    model.transformer_blocks[0].norm1.linear.register_forward_hook(lambda m, a, o: reads.append(len(a[0])))

    def run(names, samples=(0, 1)):
        reads.clear()
        latents = stage.denoise(DenoiseRequest(
            positive=Conditioning(cond.prompt_embeds[list(samples)], cond.pooled_prompt_embeds[list(samples)]),
            negative=None, height=32, width=48, num_inference_steps=3, guidance_scale=3.5, true_cfg_scale=1.0,
            seeds=[s + 1 for s in samples], loras=[[AdapterRef(n, "", 1.0)] for n in names])).latents
        return list(reads), latents

    reads_mixed, mixed = run(["q", "k"])
    assert reads_mixed == [3, 3]  # unmerged, tables: one per sample before the steps
    for i, name in enumerate(["q", "k"]):  # each sample as its request alone (merged, tables too)
        assert _rel_err(mixed[i], run([name], samples=(i,))[1][0]) < 1e-5
    assert run(["mod", "q"])[0] == [2] * 3  # an update on norm1.linear: the batch's rows every step
    assert run(["temb", "q"])[0] == [2] * 3  # or on an embedder the table runs
    assert not stage.lora.unmerged  # the batch's updates were taken off again


def test_graphed_ulysses_replica_warms_up_its_plain_forwards_too(flux_dev_dir):
    """On a CUDA Ulysses replica with graphs, forwards replayed from graphs and forwards without
    (a DiT cache, unmerged LoRA) run differently compiled blocks (SequenceParallel.for_graphs):
    the warm-up runs a cached request per size too, so no later request compiles. Not with ring
    (one variant), a variable-length text (its exchanges stay outside the compiled blocks), or
    without graphs."""
    from types import SimpleNamespace

    from services.denoiser import stage as stage_module

    seen = []
    fake = SimpleNamespace(denoise=lambda request, on_step=None: seen.append((request.height, request.cache)))

    def warm(**options):
        seen.clear()
        stage_module.warm_up(fake, DenoiserConfig(model_path=flux_dev_dir, device="cuda",
                                                  warmup_resolutions=["64x32"], **options))
        return seen

    assert warm(ulysses_degree=2) == [(32, None), (32, {"enabled": True})]
    assert warm(ulysses_degree=2, ring_degree=2) == [(32, None)]
    assert warm(ulysses_degree=2, cuda_graphs=False) == [(32, None)]
    assert warm() == [(32, None)]
    assert not stage_module.plain_forwards_compile_apart(DenoiserConfig(model_path="m", ulysses_degree=2), True)


def test_copy_engine_exchange_is_opt_in_and_says_where_it_does_nothing(flux_dev_dir, caplog):
    """--ulysses-exchange reaches the denoiser config (default nccl); a replica that has no graphed
    Ulysses forwards (here one CPU rank) says that copy-engine changes nothing for it, and the
    process-wide switch follows the config of the stage built last."""
    from services.denoiser.parallel import copy_exchange

    args = build_parser().parse_args(["serve", "--no-ray", "--ulysses-exchange", "copy-engine"])
    assert serve_config_from_args(args).stage_config("denoiser").ulysses_exchange == "copy-engine"
    assert DenoiserConfig(model_path="m").ulysses_exchange == "nccl"
    try:
        with caplog.at_level("WARNING"):
            DenoiserStage(DenoiserConfig(model_path=flux_dev_dir, device="cpu", ulysses_exchange="copy-engine"))
        assert "changes nothing here" in caplog.text and copy_exchange._enabled
        caplog.clear()
        DenoiserStage(DenoiserConfig(model_path=flux_dev_dir, device="cpu"))
        assert "changes nothing" not in caplog.text and not copy_exchange._enabled
    finally:
        copy_exchange.use_copy_engine(False)
