"""flowdppo-video: online RL (Flow-DPPO) for text-to-video flow models."""

__version__ = "0.1.0"
