"""dmtune: fine-tune language models toward constraints without catastrophic forgetting."""

__version__ = "0.1.0"
