"""The input pipeline: sources, tokenizers, example formats, packing and batching (grain)."""
