"""One module per model family, each defining that family's PipelineSpec."""

from services.runtime.pipelines.flux import FLUX
from services.runtime.pipelines.flux2 import FLUX2_KLEIN
from services.runtime.pipelines.qwen_image import QWEN_IMAGE
from services.runtime.pipelines.wan import WAN
from services.runtime.pipelines.z_image import Z_IMAGE

ALL_SPECS = (FLUX, QWEN_IMAGE, Z_IMAGE, WAN, FLUX2_KLEIN)
