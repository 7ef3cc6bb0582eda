"""HPC tier: the worker function that runs on cluster nodes (control planes come next).

Keep this package's __init__ free of imports: the worker must import nothing it does not need.
"""
