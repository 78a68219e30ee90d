"""Benchmarks: per-skill accuracy of answering models on the scene world, and
the well-formedness of an auditor's outputs."""
