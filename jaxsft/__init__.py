"""jaxsft: supervised fine-tuning of Hugging Face Transformer checkpoints in JAX/Flax NNX."""

__version__ = "0.1.0"
