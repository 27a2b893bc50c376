"""Models and weights from elsewhere: Hugging Face Llama checkpoints in and out (`hf`)."""
