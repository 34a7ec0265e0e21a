"""Small plain-PyTorch models that keep their own KV cache (no transformers)."""
