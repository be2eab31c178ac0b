"""fedvault: federated, privacy-preserving training on Flower, PyTorch and Opacus."""

__version__ = "0.1.0"
