"""Relay (data plane): frame format, end-to-end sealing and capability tokens, sans I/O.

The asyncio relay server and its clients (for the HPC tier) build on these pure modules.
"""
