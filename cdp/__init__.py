"""cdp: continuous data protection for disk images, replicated block by block."""

__version__ = "0.1.0"
