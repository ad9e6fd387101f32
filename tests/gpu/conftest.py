import pytest
import torch

from tests.tiny_checkpoints import build_tiny_flux


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="GPU tests need CUDA")
        for item in items:
            if "tests/gpu" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def flux_dev_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux-dev") / "model", guidance_embeds=True, seed=0)


@pytest.fixture(scope="session")
def flux_dev_dir_d128(tmp_path_factory):
    """The tiny Flux with 128-wide heads (cuDNN's fp8 attention takes no 16-wide ones)."""
    return build_tiny_flux(tmp_path_factory.mktemp("flux-dev-d128") / "model", guidance_embeds=True, seed=0,
                           head_dim=128)


@pytest.fixture(scope="session")
def qwen_image_dir(tmp_path_factory):
    from tests.tiny_families import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen-image") / "model")
