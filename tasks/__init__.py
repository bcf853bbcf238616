"""Prefect tasks used by the flows."""
