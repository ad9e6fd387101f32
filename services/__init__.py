"""ditserve: disaggregated serving for diffusion transformers (encoder / denoiser / VAE stages)."""

__version__ = "0.1.0"
