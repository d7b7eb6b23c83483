"""Tests of vembed.inference: Predictor, export, evaluation, serving."""
