"""tuneoff: tune language models by SFT and RLHF, and measure which one serves your task better."""

__version__ = "0.1.0"
