"""STREAM: Smart Tiered Routing Engine for AI Models.

One OpenAI-compatible endpoint over local, HPC and cloud inference tiers.
"""

__version__ = "0.1.0"
