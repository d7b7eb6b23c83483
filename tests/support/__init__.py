"""Test support: fixtures, tiny-model and synthetic-data builders, stand-in servers, workers."""
