# cython: language_level=3
"""Placeholder until the module lands."""
