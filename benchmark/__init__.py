"""ConCL-Bench: the harness that pre-trains, fine-tunes and tracks every method."""

__version__ = "0.1.0"
