"""Synthetic hospitals, partitioning and local simulation."""
