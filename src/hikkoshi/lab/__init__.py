"""Local labs: a user-space WAN emulator between TCP endpoints (the kernel here has no netem).

The top layer: it may use everything below it; nothing but the command line imports it.
"""

from .link_model import Flow, LinkDirection, WanParams
from .wan import DirectionStats, Endpoint, WanLink, WanStats

__all__ = ["DirectionStats", "Endpoint", "Flow", "LinkDirection", "WanLink", "WanParams", "WanStats"]
