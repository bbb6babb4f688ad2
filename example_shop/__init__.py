"""Example shop."""
