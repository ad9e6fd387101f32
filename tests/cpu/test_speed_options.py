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
    """--cuda-graphs reaches the denoiser config; unset, only a compiled multi-rank CUDA replica
    captures graphs; with layerwise offload it is refused, and CPU replicas never capture."""
    from types import SimpleNamespace

    import pydantic

    from services.denoiser.graphs import should_graph
    from services.denoiser.latents import PackedLatents2x2
    from services.denoiser.runner import DenoiserRunner

    args = build_parser().parse_args(["serve", "--no-ray", "--no-cuda-graphs", "--ulysses-degree", "2"])
    assert serve_config_from_args(args).stage_config("denoiser").cuda_graphs is False
    with pytest.raises(pydantic.ValidationError, match="cuda_graphs and layerwise_offload"):
        DenoiserConfig(model_path="m", cuda_graphs=True, layerwise_offload=True)

    cuda, two_ranks = torch.device("cuda"), SimpleNamespace(degrees=SimpleNamespace(world_size=2))
    def graphs(mesh, **options):
        return should_graph(DenoiserConfig(model_path="m", **options), cuda, mesh)
    assert graphs(two_ranks) and not graphs(None) and graphs(None, cuda_graphs=True)
    assert not graphs(two_ranks, compile=False) and not graphs(two_ranks, layerwise_offload=True)
    assert not graphs(two_ranks, cuda_graphs=False)
    assert not should_graph(DenoiserConfig(model_path="m", cuda_graphs=True), torch.device("cpu"), two_ranks)
    assert DenoiserRunner(torch.nn.Linear(1, 1), PackedLatents2x2(4, 8), torch.device("cpu"), torch.float32,
                          cuda_graphs=True).graphs is None
