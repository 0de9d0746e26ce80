"""kdrun: config-driven knowledge-distillation experiments for PyTorch."""

__version__ = "0.1.0"
