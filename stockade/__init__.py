"""stockade: an edge security gateway with an XDP fast path."""

__version__ = "0.1.0"
