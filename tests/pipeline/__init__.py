"""Tests of vembed.pipeline, components/ and pipelines/: steps, launchers, compiled and local pipelines."""
