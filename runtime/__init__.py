"""Edgeward runtime: backends, converters, run-script host and worker processes."""
