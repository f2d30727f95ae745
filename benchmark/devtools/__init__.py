"""Developer tools, apart from the runtime stages: ``make bench`` and ``make gpu-check``."""
