"""Bring your own model: Flax modules and Hugging Face checkpoints in."""
