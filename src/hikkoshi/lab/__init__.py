"""Local labs: a user-space WAN emulator between TCP endpoints (the kernel here has no netem).

The top layer: it may use everything below it; nothing but the command line imports it.
"""

from hikkoshi.lab.link_model import Flow, LinkDirection, WanParams
from hikkoshi.lab.wan import DirectionStats, Endpoint, WanLink, WanStats

__all__ = ["DirectionStats", "Endpoint", "Flow", "LinkDirection", "WanLink", "WanParams", "WanStats"]
