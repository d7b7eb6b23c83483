"""Compile-time settings shared by the components: the default images.

`VEMBED_IMAGE` (CPU steps) and `VEMBED_TRAIN_IMAGE` (CUDA steps) override the defaults when a component is
imported. The pipeline also exposes both as run parameters (`image`, `train_image`), which take precedence.
"""

from __future__ import annotations

import os

from vembed import __version__

IMAGE_REPOSITORY = "ghcr.io/vembed-factory/vembed"
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cpu"
DEFAULT_TRAIN_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cuda"

CPU_IMAGE = os.environ.get("VEMBED_IMAGE") or DEFAULT_IMAGE
GPU_IMAGE = os.environ.get("VEMBED_TRAIN_IMAGE") or DEFAULT_TRAIN_IMAGE
