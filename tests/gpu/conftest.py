import pytest
import torch

from tests.tiny_checkpoints import build_tiny_flux

if not torch.cuda.is_available():
    pytest.skip("GPU tests need CUDA", allow_module_level=True)


@pytest.fixture(scope="session")
def flux_dev_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux-dev") / "model", guidance_embeds=True, seed=0)
