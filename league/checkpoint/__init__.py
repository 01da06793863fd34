"""Checkpoint formats: Hugging Face safetensors folders in and out, train state with torch.distributed.checkpoint."""
