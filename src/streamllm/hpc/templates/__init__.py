"""Cluster-side templates: Globus Compute endpoint engines, a vLLM job script, a config fragment."""
