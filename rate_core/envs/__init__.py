"""Environments of the memory tasks."""
