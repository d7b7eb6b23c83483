"""The `mlflow.pyfunc` face of an embedding model: `predict(texts)` returns `Predictor.encode_text(texts)`.

Logged as "models from code" (a generated two-line script, see `MODEL_CODE`), so no pickled
object is stored. The model's artifacts are the directories the registry logs: `merged` (a standalone model) and/or
`adapter` (a LoRA checkpoint). Loading prefers the merged model. The code is not bundled: the
serving environment installs vembed-factory (see `pip_requirements` in vembed.registry).
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

MERGED_ARTIFACT = "merged"
ADAPTER_ARTIFACT = "adapter"
# Model params a caller may pass to predict(); 0 means the full dimension.
DEFAULT_PARAMS: dict[str, Any] = {"dim": 0, "is_query": False, "batch_size": 32}
# The script MLflow stores and runs at load time instead of unpickling a Python object.
MODEL_CODE = (
    "from mlflow.models import set_model\n"
    "from vembed.mlflow_model import EmbeddingModel\n"
    "set_model(EmbeddingModel())\n"
)


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
    """Text embeddings through vembed.predictor.Predictor."""

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
