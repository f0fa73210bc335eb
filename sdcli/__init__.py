"""sd: continual fine-tuning of language models by on-policy self-distillation."""

__version__ = "0.1.0"
