"""Tests import the tiny tokenizer from here; it lives in the library (the demo uses it too)."""
from ldm_jax.tiny_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, write_tiny_clip_tokenizer

__all__ = ["BOS_TOKEN_ID", "EOS_TOKEN_ID", "VOCAB_SIZE", "write_tiny_clip_tokenizer"]
