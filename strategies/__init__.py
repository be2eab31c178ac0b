"""Aggregation strategies: registry, built-ins, plug-in loading and update validation."""
