"""VAE stage: latents -> pixels (decode); pixels -> latents (encode) arrives with image editing."""
