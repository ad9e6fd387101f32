"""Encoder stage: prompts -> embeddings, with the text encoders a pipeline spec names."""
