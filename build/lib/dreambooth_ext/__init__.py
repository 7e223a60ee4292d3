"""Dreambooth training engine for Stable Diffusion checkpoints in the WebUI's layout."""

__version__ = "0.1.0"
