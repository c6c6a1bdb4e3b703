"""Edgeward agent: packages, crypto, residual patches, store, sockets and the CLI."""

from agent.errors import EdgewardError

__all__ = ["EdgewardError", "__version__"]
__version__ = "0.1.0"
