"""What a registered model version holds, and how standard servers load it (the torch side of registering).

- Text models: MLflow's native `sentence_transformers` flavor, built from the merged model, so
  `mlflow models serve`, MLServer and KServe load it without vembed (public requirements only). The
  query instruction is the prompt `query` (`params={"prompt_name": "query"}`); an MRL dimension is
  `params={"truncate_dim": 64}` (truncated first, then normalised, as Predictor does).
- CLIP / Qwen3-VL: a pyfunc "model from code" (a two-line script, no pickle) whose `predict(texts)` is
  `Predictor.encode_text`; the vembed package travels with it (`code_paths`).
- The LoRA adapter, when given, is in the same version (`adapter/`).
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import mlflow.sentence_transformers
import numpy as np

from vembed.artifacts.mlflow_store import ADAPTER_ARTIFACT, MERGED_ARTIFACT, ST_DATA_PATH

# Model params a caller may pass to the pyfunc predict(); dim 0 means the full dimension.
DEFAULT_PARAMS: dict[str, Any] = {"dim": 0, "is_query": False, "batch_size": 32}
# The script MLflow stores and runs at load time instead of unpickling a Python object.
MODEL_CODE = "from mlflow.models import set_model\nfrom vembed.artifacts.mlflow_model import EmbeddingModel\nset_model(EmbeddingModel())\n"
# Public packages each route imports at inference time.
_ST_PACKAGES = ("torch", "transformers", "sentence-transformers")
_PYFUNC_PACKAGES = (*_ST_PACKAGES, "peft", "safetensors", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "accelerate")


def pinned(packages: tuple[str, ...]) -> list[str]:
    """`name==installed version` (local build tags such as `+cpu` dropped). Explicit: MLflow's own
    inference is slow, may reach the network and would name vembed, which is not published."""
    out = []
    for name in packages:
        try:
            out.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def build_model(tmp: Path, artifacts: dict[str, str], mlflow_model: Any, example: list[str]) -> Path:
    """The MLflow model directory `tmp/model` for staged `artifacts` ({merged, adapter: directory});
    an adapter-only text model is merged here first (standard servers need merged weights)."""
    from mlflow.models import infer_signature
    from mlflow.types.schema import ParamSchema, ParamSpec

    from vembed.inference.predictor import Predictor

    predictor, local = Predictor(artifacts.get(MERGED_ARTIFACT) or artifacts[ADAPTER_ARTIFACT]), tmp / "model"
    if predictor.spec.family != "text":
        (tmp / "embedding_model.py").write_text(MODEL_CODE)
        mlflow.pyfunc.save_model(
            str(local),
            python_model=str(tmp / "embedding_model.py"),
            artifacts=artifacts,
            signature=infer_signature(example, predictor.encode_text(example), params=DEFAULT_PARAMS),
            code_paths=[str(Path(__file__).parent.parent)],  # the vembed package itself
            pip_requirements=pinned(_PYFUNC_PACKAGES),
            mlflow_model=mlflow_model,
        )
        return local
    from sentence_transformers import SentenceTransformer

    if MERGED_ARTIFACT not in artifacts:
        from vembed.inference.export import merge_adapter

        artifacts[MERGED_ARTIFACT] = str(merge_adapter(artifacts[ADAPTER_ARTIFACT], tmp / MERGED_ARTIFACT))
    merged, normalize = Path(artifacts[MERGED_ARTIFACT]), predictor.spec.normalize
    model = SentenceTransformer(str(merged), device="cpu")
    embeddings = model.encode(example, normalize_embeddings=normalize)
    signature = infer_signature(example, embeddings, params={"normalize_embeddings": normalize, "batch_size": 32})
    # Without a default (the model's own behaviour unless asked), so `infer_signature` cannot type them.
    signature.params = ParamSchema([ParamSpec("prompt_name", "string", None), ParamSpec("truncate_dim", "long", None), *signature.params.params])
    mlflow.sentence_transformers.save_model(
        model,
        str(local),
        signature=signature,
        pip_requirements=pinned(_ST_PACKAGES),
        mlflow_model=mlflow_model,
        metadata={"vembed.prompts": sorted(model.prompts), "vembed.dim": int(embeddings.shape[1])},
    )
    # Predictor reads the pooling/instruction spec from embedder.json; the adapter travels alongside.
    if (merged / "embedder.json").is_file():
        shutil.copy2(merged / "embedder.json", local / ST_DATA_PATH / "embedder.json")
    if ADAPTER_ARTIFACT in artifacts:
        shutil.copytree(artifacts[ADAPTER_ARTIFACT], local / ADAPTER_ARTIFACT)
    return local


class EmbeddingModel(mlflow.pyfunc.PythonModel):
    """Text embeddings through vembed.inference.predictor.Predictor (the pyfunc route for CLIP and Qwen3-VL)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from vembed.inference.predictor import Predictor

        self._predictor = Predictor(context.artifacts.get(MERGED_ARTIFACT) or context.artifacts[ADAPTER_ARTIFACT])

    # No type hints on model_input/params: MLflow would derive its own input schema from them and
    # fight the explicit signature. MLflow has checked both against the signature: `model_input` is a
    # one-column DataFrame of strings, and `params` holds every param (defaults filled in).
    def predict(self, context, model_input, params=None) -> np.ndarray:
        return self._predictor.encode_text(
            [str(t) for t in model_input.iloc[:, 0]],
            batch_size=int(params["batch_size"]),
            dim=int(params["dim"]) or None,
            is_query=bool(params["is_query"]),
        )
