"""Recipes (a conversion as data), jobs (convert, verify, evaluate, gate) and batches of them for CI."""
