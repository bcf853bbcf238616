"""Prefect flows: generate, eval, bench."""
