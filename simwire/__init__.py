"""Simwire shared kernel: model, ports, errors, config, clock and the composition root."""

__version__ = "0.1.0"
