"""Tests of vembed.models: encoder families, pooling, LoRA wiring, lean kernels."""
