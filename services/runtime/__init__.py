"""Shared by every service: config, errors, model registry, stage messages, device helpers.

Imports no service package (encoder, denoiser, vae, router, gateway)."""
