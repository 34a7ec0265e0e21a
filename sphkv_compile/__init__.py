"""sphkv: spherical KV-cache compression as a torch.compile backend."""
