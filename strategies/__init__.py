"""Aggregation strategies for staged, grouped parameters (federation work)."""
