"""qconvert: Hugging Face checkpoints to quantized checkpoints that real engines load."""

__version__ = "0.1.0"
