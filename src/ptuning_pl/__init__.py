"""P-Tuning v2 of ChatGLM-family models on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
