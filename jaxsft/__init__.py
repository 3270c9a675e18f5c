"""jaxsft: supervised fine-tuning of Hugging Face Transformer checkpoints in JAX/Flax NNX."""

import os

# transformers' advice on import that PyTorch is missing is noise here: jaxsft never uses its models.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
