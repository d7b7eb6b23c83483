"""Tests of vembed.training: the loop, GradCache, losses, distributed and FSDP runs, resume."""
