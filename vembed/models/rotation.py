"""An orthogonal rotation of the embedding space that puts the most information in the leading dims.

Truncating an embedding (MRL) keeps its first dims. After training, the embeddings of the training
data are rotated onto their principal axes (uncentred PCA: the eigenvectors of X^T X for unit rows
X), so the first k dims span the best k-dim subspace of the data. The rotation is orthogonal, so
full-dim dot products and cosines are exactly those of the unrotated model. docs/benchmarks.md has
the measured gain at a quarter of the dim.

The rotation is stored next to the weights (ROTATION_FILE); a merged text model also carries it
as a sentence-transformers Dense layer, so servers that never see vembed apply it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROTATION_FILE = "embedding_rotation.safetensors"


def fit_rotation(embeddings: torch.Tensor) -> torch.Tensor:
    """[D, D] orthogonal matrix R whose columns are the principal axes of the unit-normalised rows
    of `embeddings` [N, D], by decreasing variance; `x @ R` is the rotated embedding. Each axis's
    sign is fixed (its largest component positive), so the same data always gives the same R."""
    x = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    rot = vectors.flip(-1)
    signs = torch.sign(rot.gather(0, rot.abs().argmax(0, keepdim=True)))
    return (rot * signs).float().contiguous()


def save_rotation(directory: Path, rotation: torch.Tensor) -> None:
    save_file({"rotation": rotation.detach().cpu().contiguous()}, str(Path(directory) / ROTATION_FILE))


def load_rotation(directory: Path) -> torch.Tensor | None:
    """The rotation stored in a model directory, None when it has none. A sentence-transformers directory
    (e.g. the copy inside a registered MLflow model) may hold it only as a square, bias-free,
    identity-activation Dense layer after the pooling."""
    d = Path(directory)
    if (d / ROTATION_FILE).is_file():
        return load_file(str(d / ROTATION_FILE))["rotation"]
    modules = json.loads((d / "modules.json").read_text()) if (d / "modules.json").is_file() else []
    for module in (m for m in modules if m.get("type", "").endswith("Dense")):
        config = json.loads((d / module["path"] / "config.json").read_text())
        square = config.get("in_features") == config.get("out_features")
        if square and not config.get("bias", True) and config.get("activation_function", "").endswith("Identity"):
            return load_file(str(d / module["path"] / "model.safetensors"))["linear.weight"].T.contiguous()
    return None
