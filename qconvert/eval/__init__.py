"""Evaluation of written outputs: perplexity and KL divergence against the base model."""
