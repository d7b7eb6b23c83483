"""`vembed serve MODEL`: an OpenAI-compatible embeddings server (FastAPI + uvicorn).

`POST /v1/embeddings` takes what OpenAI's API takes (`input`: a string or a list of strings,
`model`, `dimensions` for MRL truncation, `encoding_format` float|base64), so a client written for
the cluster endpoint works unchanged on a laptop. One extra, optional field: `input_type`
("query" applies the model's query instruction; default "document"). `GET /health` and
`GET /v1/models` report the loaded model. Embeddings are `Predictor.encode_text`, exactly.

Binds 127.0.0.1 by default; a container (the KServe custom predictor) passes `--host 0.0.0.0`.
"""

from __future__ import annotations

import base64
import socket
import threading
from typing import Any, Literal

from pydantic import BaseModel, Field

from vembed.errors import VembedError

DEFAULT_PORT = 8080
MAX_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    dimensions: int | None = Field(default=None, gt=0)
    encoding_format: Literal["float", "base64"] = "float"
    input_type: Literal["query", "document"] = "document"
    user: str | None = None


def serve_command(model_uri: str, port: int = DEFAULT_PORT) -> str:
    """The exact shell command that serves `model_uri` locally."""
    import shlex

    return f"vembed serve {shlex.quote(model_uri)}" + (f" --port {port}" if port != DEFAULT_PORT else "")


def create_app(predictor: Any, model_id: str) -> Any:
    """The FastAPI app around a loaded Predictor (anything with encode_text/dim/embedder)."""
    import numpy as np
    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="vembed embeddings", version="1")
    lock = threading.Lock()  # one forward at a time: torch already uses every core per batch

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "dim": predictor.dim}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "vembed"}]}

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts or len(texts) > MAX_INPUTS:
            raise HTTPException(400, f"input: give 1 to {MAX_INPUTS} strings, got {len(texts)}")
        if req.dimensions is not None and req.dimensions > predictor.dim:
            raise HTTPException(400, f"dimensions: {req.dimensions} > the model's {predictor.dim}")
        try:
            with lock:
                emb = predictor.encode_text(texts, dim=req.dimensions, is_query=req.input_type == "query")
        except VembedError as e:
            raise HTTPException(400, str(e)) from None
        emb = np.asarray(emb, dtype="<f4")
        as_base64 = req.encoding_format == "base64"
        vectors = [base64.b64encode(row.tobytes()).decode() for row in emb] if as_base64 else emb.tolist()
        tokens = sum(len(ids) for ids in predictor.embedder.tokenizer(texts, add_special_tokens=True)["input_ids"])
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return app


def make_server(
    model_uri: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, device: str | None = None
) -> Any:
    """A uvicorn.Server for the model (loaded now, so a bad model fails before anything listens)."""
    import uvicorn

    from vembed.inference.predictor import Predictor

    predictor = Predictor(model_uri, device=device)
    config = uvicorn.Config(create_app(predictor, model_id=model_uri), host=host, port=port, log_level="warning")
    return uvicorn.Server(config)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, opened before `serving ...` is printed: a port in use or a bad host is one
    line naming the address (uvicorn would log it after that line and exit 3)."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0-65535
        raise VembedError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None


def serve(model_uri: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, device: str | None = None) -> None:
    """Load the model, then serve until interrupted."""
    server = make_server(model_uri, host, port, device)
    sock = listen(host, port)
    print(f"serving {model_uri} at http://{host}:{port}/v1/embeddings (Ctrl-C stops)", flush=True)
    server.run(sockets=[sock])
