"""One module per model family, each defining that family's PipelineSpec."""

from services.runtime.pipelines.flux import FLUX
from services.runtime.pipelines.flux2 import FLUX2_DEV, FLUX2_KLEIN
from services.runtime.pipelines.qwen_image import QWEN_IMAGE, QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS
from services.runtime.pipelines.wan import WAN, WAN_I2V
from services.runtime.pipelines.z_image import Z_IMAGE

ALL_SPECS = (FLUX, QWEN_IMAGE, QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS, Z_IMAGE, WAN, WAN_I2V, FLUX2_KLEIN, FLUX2_DEV)
