"""NeVA model: the LLaMA-family decoder, the CLIP vision tower, projectors and the wrapper."""
