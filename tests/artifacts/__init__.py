"""Tests of vembed.artifacts: storage, registry, promotion."""
