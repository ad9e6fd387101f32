"""Denoiser stage: embeddings + seeds -> latents, with native DiT implementations.

models/    one file per model family (native modules that load diffusers weights unchanged)
attention  the one attention dispatch every model calls
schedule   CPU bookkeeping: the sigma schedule of a request
latents    initial noise and the family's latent layout (packing, position ids)
runner     the only code that runs the DiT on the device
loop       the sampling loop: runner -> guidance -> Euler step, per step
stage      the stage object the router calls
"""
