"""vembed-factory: fine-tune embedding models with LoRA."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]

if TYPE_CHECKING:
    from vembed.inference.predictor import Predictor


def __getattr__(name: str):
    # Lazy, so `import vembed` (and the CLI) does not pay for torch.
    if name == "Predictor":
        from vembed.inference.predictor import Predictor

        return Predictor
    raise AttributeError(name)
