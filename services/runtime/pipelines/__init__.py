"""One module per model family, each defining that family's PipelineSpec."""

from services.runtime.pipelines.flux import FLUX

ALL_SPECS = (FLUX,)
