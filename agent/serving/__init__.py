"""The serving wing: HTTP, the v2 (KServe) protocol, tensors, the model registry, the
worker host, its IPC, connection lending and the worker's entry point.

``runtime`` runs a model; this package serves it. The daemon imports from here, and
nothing here imports the daemon (the architecture contract in setup.cfg checks it).
"""
