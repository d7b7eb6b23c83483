"""Kubeflow pipeline definitions and the `vembed pipeline` command (compile, run --local, submit, schedule)."""
