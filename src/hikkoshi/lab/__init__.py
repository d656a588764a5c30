"""Local labs: a user-space WAN emulator between TCP endpoints (the kernel here has no netem), and hosts
as network namespaces.

The top layer: it may use everything below it; nothing but the command line imports it. The package
itself imports nothing, so the pure link model (:mod:`hikkoshi.lab.link_model`) loads without asyncio.
"""
