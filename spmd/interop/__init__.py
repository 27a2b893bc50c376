"""Models and weights from elsewhere: Hugging Face Llama checkpoints in and out (`hf`), and
Flax NNX and Linen modules as spmd models (`flax_adapter`)."""
