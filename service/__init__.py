"""Multi-task adapter service: one frozen transformer backbone, many tasks as bottleneck adapters + heads."""

__version__ = "0.1.0"
