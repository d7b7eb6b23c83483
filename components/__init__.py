"""KFP components: one folder per pipeline step, each a thin shell over `vembed.pipeline.steps`.

Component functions import `vembed` inside their bodies: KFP ships only the function source to the pod,
and the image (see images/) carries the package, so nothing is pip-installed at run time.
Component modules must not use `from __future__ import annotations`: KFP reads the real annotations
(`Input[Dataset]`, `Output[Model]`) to build the interface.
"""
