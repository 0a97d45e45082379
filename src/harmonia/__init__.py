"""harmonia: robust and balanced multimodal learning for PyTorch."""

__version__ = "0.1.0"
