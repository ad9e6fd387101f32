import pytest

from tests.tiny_checkpoints import build_tiny_flux


@pytest.fixture(scope="session")
def flux_dev_dir(tmp_path_factory):
    """A tiny Flux.1-dev layout (guidance embedding) written by diffusers' save_pretrained."""
    return build_tiny_flux(tmp_path_factory.mktemp("flux-dev") / "model", guidance_embeds=True, seed=0)


@pytest.fixture(scope="session")
def flux_schnell_dir(tmp_path_factory):
    """A tiny Flux.1-schnell layout (no guidance embedding)."""
    return build_tiny_flux(tmp_path_factory.mktemp("flux-schnell") / "model", guidance_embeds=False, seed=1)


@pytest.fixture(scope="session")
def flux_tp_dir(tmp_path_factory):
    """The tiny Flux.1-dev layout with a T5 that splits over 2 ranks (4 heads, d_ff 36)."""
    return build_tiny_flux(tmp_path_factory.mktemp("flux-tp") / "model", guidance_embeds=True, seed=0, t5_d_ff=36)


@pytest.fixture(scope="session")
def qwen_image_dir(tmp_path_factory):
    """A tiny Qwen-Image layout: Qwen2.5-VL text encoder, 3-head MMDiT, Qwen-Image's VAE."""
    from tests.tiny_families import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen-image") / "model")


@pytest.fixture(scope="session")
def z_image_dir(tmp_path_factory):
    """A tiny Z-Image (Turbo) layout: Qwen3 text encoder, 2-head single-stream DiT, AutoencoderKL."""
    from tests.tiny_families import build_tiny_z_image

    return build_tiny_z_image(tmp_path_factory.mktemp("z-image") / "model")


@pytest.fixture(scope="session")
def qwen_image_edit_dir(tmp_path_factory):
    """A tiny Qwen-Image-Edit layout: Qwen2.5-VL with its vision tower and processor, the MMDiT, a VAE that encodes."""
    from tests.tiny_families import build_tiny_qwen_image_edit

    return build_tiny_qwen_image_edit(tmp_path_factory.mktemp("qwen-image-edit") / "model")


@pytest.fixture(scope="session")
def qwen_image_edit_plus_dir(tmp_path_factory):
    """The same with QwenImageEditPlusPipeline's model_index.json (several input images)."""
    from tests.tiny_families import build_tiny_qwen_image_edit

    return build_tiny_qwen_image_edit(tmp_path_factory.mktemp("qwen-image-edit-plus") / "model", plus=True)
