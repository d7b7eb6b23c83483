"""What a registered model version holds, and how standard servers load it.

- Text models: MLflow's native `sentence_transformers` flavor, built from the merged model. Standard
  servers (`mlflow models serve`, MLServer, KServe) load it without vembed; its requirements are
  public packages only. The query instruction is the sentence-transformers prompt `query`
  (`params={"prompt_name": "query"}`), and an MRL dimension is `params={"truncate_dim": 64}`
  (encode truncates first, then normalises, as Predictor does).
- CLIP / Qwen3-VL: a pyfunc "model from code" (a generated two-line script, no pickle) whose
  `predict(texts)` is `Predictor.encode_text`; the vembed package travels with it (`code_paths`),
  so again only public packages are required.
- Every version also holds the LoRA adapter (directory `adapter/` next to MLmodel) when one was given.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from vembed.mlflow_store import ADAPTER_ARTIFACT, MERGED_ARTIFACT, ST_DATA_PATH

# Model params a caller may pass to the pyfunc predict(); 0 means the full dimension.
DEFAULT_PARAMS: dict[str, Any] = {"dim": 0, "is_query": False, "batch_size": 32}
# The script MLflow stores and runs at load time instead of unpickling a Python object.
MODEL_CODE = (
    "from mlflow.models import set_model\n"
    "from vembed.mlflow_model import EmbeddingModel\n"
    "set_model(EmbeddingModel())\n"
)
# Public packages the bundled vembed code imports at inference time (pyfunc route).
_PYFUNC_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "sentence-transformers",
    "numpy",
    "pandas",
    "pillow",
    "pydantic",
    "pyyaml",
    "accelerate",
)
_ST_PACKAGES = ("torch", "transformers", "sentence-transformers")


def pinned(packages: tuple[str, ...]) -> list[str]:
    """`name==installed version` for each package (local build tags such as `+cpu` dropped)."""
    out = []
    for name in packages:
        try:
            out.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def save_text_model(
    path: Path, merged_dir: Path, *, normalize: bool, mlflow_model: Any, example: list[str]
) -> None:
    """The merged model in MLflow's sentence_transformers flavor, plus vembed's embedder.json next to it."""
    import mlflow.sentence_transformers
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(merged_dir), device="cpu")
    output = model.encode(example, normalize_embeddings=normalize)
    params = ParamSchema(
        [
            ParamSpec("prompt_name", "string", None),
            ParamSpec("truncate_dim", "long", None),
            ParamSpec("normalize_embeddings", "boolean", normalize),
            ParamSpec("batch_size", "long", 32),
        ]
    )
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, int(output.shape[1])))]),
        params=params,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        mlflow.sentence_transformers.save_model(
            model,
            str(path),
            signature=signature,
            # Explicit: no dependency inference (slow, may reach the network), public packages only.
            pip_requirements=pinned(_ST_PACKAGES),
            mlflow_model=mlflow_model,
            metadata={"vembed.prompts": sorted(model.prompts), "vembed.dim": int(output.shape[1])},
        )
    # Predictor reads the pooling/instruction spec from embedder.json; the ST files are unchanged.
    if (merged_dir / "embedder.json").is_file():
        shutil.copy2(merged_dir / "embedder.json", path / ST_DATA_PATH / "embedder.json")


def save_pyfunc_model(
    path: Path, artifacts: dict[str, str], *, signature: Any, mlflow_model: Any, code_file: Path
) -> None:
    """A vision(-language) model as a pyfunc whose code (the vembed package) travels with it."""
    code_file.write_text(MODEL_CODE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(code_file),
            artifacts=artifacts,
            signature=signature,
            code_paths=[str(Path(__file__).parent)],  # the vembed package itself
            pip_requirements=pinned(_PYFUNC_PACKAGES),
            mlflow_model=mlflow_model,
        )


def save_embedding_model(tmp: Path, artifacts: dict[str, str], mlflow_model: Any, example: list[str]) -> Path:
    """The MLflow model directory (`tmp/model`) for staged `artifacts` ({merged, adapter: dir}).

    Text models: the sentence_transformers flavor from the merged model (an adapter-only
    registration is merged here first), the adapter copied next to it. CLIP / Qwen3-VL: a pyfunc
    with its code bundled. This is the torch side of registering; the registry only logs the result.
    """
    from mlflow.models import infer_signature

    from vembed.predictor import Predictor

    predictor = Predictor(artifacts.get(MERGED_ARTIFACT) or artifacts[ADAPTER_ARTIFACT])
    local = tmp / "model"
    if predictor.spec.family != "text":
        output = predictor.encode_text(example)
        signature = infer_signature(example, output, params=DEFAULT_PARAMS)
        save_pyfunc_model(
            local,
            artifacts,
            signature=signature,
            mlflow_model=mlflow_model,
            code_file=tmp / "embedding_model.py",
        )
        return local
    if MERGED_ARTIFACT not in artifacts:
        from vembed.export import merge_adapter  # standard servers need the merged weights

        artifacts[MERGED_ARTIFACT] = str(merge_adapter(artifacts[ADAPTER_ARTIFACT], tmp / MERGED_ARTIFACT))
    merged = Path(artifacts[MERGED_ARTIFACT])
    save_text_model(
        local, merged, normalize=predictor.spec.normalize, mlflow_model=mlflow_model, example=example
    )
    if ADAPTER_ARTIFACT in artifacts:
        shutil.copytree(artifacts[ADAPTER_ARTIFACT], local / ADAPTER_ARTIFACT)
    return local


def model_dir_from_artifacts(artifacts: dict[str, str]) -> str:
    """The directory Predictor loads: the merged model if there is one, else the adapter."""
    for key in (MERGED_ARTIFACT, ADAPTER_ARTIFACT):
        if artifacts.get(key):
            return artifacts[key]
    raise ValueError(
        f"embedding model has neither a {MERGED_ARTIFACT!r} nor an {ADAPTER_ARTIFACT!r} artifact"
    )


def texts_from_input(model_input: Any) -> list[str]:
    """Accept what pyfunc hands over: a list of strings, one string, a Series/array, or a DataFrame
    (the `text` column if present, else its only column)."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            column = model_input["text"]
        elif model_input.shape[1] == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected one text column or a 'text' column, got {list(model_input.columns)}")
        return [str(t) for t in column.tolist()]
    if isinstance(model_input, pd.Series | np.ndarray):
        return [str(t) for t in np.asarray(model_input).reshape(-1).tolist()]
    if isinstance(model_input, list | tuple):
        return [str(t) for t in model_input]
    raise ValueError(f"expected a list of strings or a DataFrame, got {type(model_input).__name__}")


class EmbeddingModel(mlflow.pyfunc.PythonModel):
    """Text embeddings through vembed.predictor.Predictor (the pyfunc route for CLIP and Qwen3-VL)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from vembed.predictor import Predictor

        self._predictor = Predictor(model_dir_from_artifacts(context.artifacts))

    # No type hint on model_input/params on purpose: MLflow would then derive its own input schema
    # from the hints and fight the explicit signature the registry logs.
    def predict(self, context, model_input, params=None) -> np.ndarray:
        opts = {**DEFAULT_PARAMS, **(params or {})}
        return self._predictor.encode_text(
            texts_from_input(model_input),
            batch_size=int(opts["batch_size"]),
            dim=int(opts["dim"]) or None,
            is_query=bool(opts["is_query"]),
        )
