"""Exports of a trained model to other formats (transformers: `hf`)."""
