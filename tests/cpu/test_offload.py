"""Layerwise offload on CPU: synchronous copies, same slot bookkeeping as on CUDA."""

import pytest
import torch

from services.denoiser.latents import PackedLatents2x2
from services.denoiser.models.flux import FluxConfig, FluxTransformer
from services.denoiser.offload import LayerwiseOffload, enable_layerwise_offload

CPU = torch.device("cpu")


def _model() -> FluxTransformer:
    # 5 blocks: with 2 slots a block-index slot rule would put block 4 and the next step's block 0
    # in the same slot, which these tests would catch.
    torch.manual_seed(0)
    cfg = FluxConfig(
        num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, in_channels=16, axes_dims_rope=(4, 6, 6), guidance_embeds=True,
    )  # fmt: skip
    return FluxTransformer(cfg).eval()


def _steps(model: FluxTransformer, n: int = 3) -> list[torch.Tensor]:
    """n forwards on one request's inputs, a different timestep each, as the sampling loop does."""
    cfg, batch, h, w, text_len = model.config, 2, 8, 6, 7
    g = torch.Generator().manual_seed(1)
    layout = PackedLatents2x2(cfg.in_channels // 4, 8)
    x = torch.randn(batch, (h // 2) * (w // 2), cfg.in_channels, generator=g)
    ctx = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    rope = model.rope(layout.text_ids(text_len, CPU), layout.image_ids(h, w, CPU))
    guidance = torch.full((batch,), 3.5)
    with torch.inference_mode():
        return [model(x, ctx, pooled, torch.full((batch,), 1.0 - k / n), rope, guidance) for k in range(n)]


def _blocks(model):
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def _assert_equal(got, expected):
    assert expected[0].std() > 0.1, "outputs too small to be a meaningful comparison"
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("prefetch", [1, 2, 9])
def test_outputs_unchanged(prefetch):
    model = _model()
    expected = _steps(model)
    offload = enable_layerwise_offload(model, CPU, prefetch)
    _assert_equal(_steps(model), expected)
    _assert_equal(_steps(model), expected)  # a second request picks up the copies queued by the first
    assert len(offload._slots) == min(prefetch, len(_blocks(model)) - 1) + 1


def test_weights_rest_in_one_flat_host_buffer_per_block():
    model = _model()
    resident = [p.data for b in _blocks(model) for p in b.parameters()]  # held, so no address is reused
    resident_ptrs = {t.untyped_storage().data_ptr() for t in resident}
    rest = {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters() if "transformer_blocks" not in n}
    offload = enable_layerwise_offload(model, CPU, prefetch=2)

    def flat_buffer(block):
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage() for p in block.parameters()}
        assert len(storages) == 1, "a block's params should be views of one flat buffer"
        return next(iter(storages.items()))

    buffers = dict(flat_buffer(b) for b in _blocks(model))
    assert len(buffers) == len(_blocks(model)) and not buffers.keys() & resident_ptrs
    assert offload.device_bytes == 3 * max(s.nbytes() for s in buffers.values())
    assert rest == {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters() if n in rest}
    _steps(model, 1)  # after a forward the weights are back at rest in their host buffer
    assert dict(flat_buffer(b) for b in _blocks(model)).keys() == buffers.keys()


def test_remove_restores_resident_weights():
    model = _model()
    expected = _steps(model)
    offload = enable_layerwise_offload(model, CPU)
    _steps(model, 2)
    offload.remove()
    assert offload.device_bytes == 0
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in _blocks(model))
    params = [p for b in _blocks(model) for p in b.parameters()]
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)
    _assert_equal(_steps(model), expected)


def test_block_called_out_of_order_restarts_the_queue():
    model = _model()
    expected = _steps(model)
    enable_layerwise_offload(model, CPU)
    block = model.single_transformer_blocks[1]
    x, temb = torch.randn(1, 5, model.config.inner_dim), torch.randn(1, model.config.inner_dim)
    with torch.inference_mode():
        block(x, temb, (torch.ones(5, 16), torch.zeros(5, 16)))
    _assert_equal(_steps(model), expected)


def test_prefetch_must_be_positive():
    with pytest.raises(ValueError, match="prefetch must be >= 1"):
        LayerwiseOffload(_blocks(_model()), CPU, prefetch=0)


def test_hooks_stay_outside_compiled_blocks():
    # The service compiles each block's forward; offload hooks run eagerly around it, and
    # repointing parameters at another slot's memory must not cost a recompile.
    torch._dynamo.reset()
    model = _model()
    for block in _blocks(model):
        block.forward = torch.compile(block.forward, fullgraph=True, backend="eager")
    expected = _steps(model)
    enable_layerwise_offload(model, CPU)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _assert_equal(_steps(model), expected)
