"""Run parameters of a compiled pipeline: names, types and `--param k=v` parsing against them."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from vembed.config import parse_pairs
from vembed.errors import ConfigError

REQUIRED = object()


def read_pipeline_parameters(package: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """{name: {"type": "STRING" | "LIST" | ..., "default": value or REQUIRED}} from a compiled IR YAML."""
    path = Path(package)
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ConfigError(f"{path}: compiled pipeline not found; run `vembed pipeline compile` first") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not a compiled pipeline (invalid YAML: {e})") from None
    spec = docs[0] if docs and isinstance(docs[0], dict) else {}
    return parameters_from_spec(spec, str(path))


def parameters_from_spec(spec: Mapping[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The run parameters of a pipeline spec (a compiled file's first document, or an uploaded version's)."""
    params = (spec.get("root") or {}).get("inputDefinitions", {}).get("parameters")
    if params is None:
        raise ConfigError(f"{where}: not a compiled KFP pipeline (no root.inputDefinitions.parameters)")
    return {
        name: {"type": p.get("parameterType", "STRING"), "default": p.get("defaultValue", REQUIRED)}
        for name, p in params.items()
    }


# Parameter type -> (reader, what a bad value should have been, (type a JSON value must have, its name) or None)
_READERS = {
    "NUMBER_INTEGER": (int, "an integer", None),
    "NUMBER_DOUBLE": (float, "a number", None),
    "LIST": (json.loads, 'a JSON list, e.g. ["lora_r=32","epochs=2"]', (list, "a JSON list")),
    "STRUCT": (json.loads, "a JSON object", (dict, "a JSON object")),
}


def _coerce(name: str, kind: str, raw: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"--param {name}={raw}: expected {expected}")

    if kind == "LIST" and not raw.strip().startswith("["):  # a,b,c
        return [item for item in raw.strip().split(",") if item]
    if kind == "BOOLEAN":
        if raw.lower() in ("true", "1", "yes", "false", "0", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise bad("true or false")
    if kind not in _READERS:  # STRING, and any type a newer KFP adds
        return raw
    read, expected, json_type = _READERS[kind]
    try:
        value = read(raw)
    except ValueError:  # json.JSONDecodeError included
        raise bad(expected) from None
    if json_type and not isinstance(value, json_type[0]):
        raise bad(json_type[1])
    return value


def parse_params(pairs: Iterable[str], spec: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Turn `k=v` strings into typed run arguments; unknown names suggest the closest parameter."""

    def unknown(name: str) -> ConfigError | None:
        if name in spec:
            return None
        close = difflib.get_close_matches(name, list(spec), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f"; parameters: {', '.join(sorted(spec))}"
        return ConfigError(f"--param: unknown pipeline parameter {name!r}{hint}")

    return parse_pairs(pairs, "--param", lambda name, raw: _coerce(name, spec[name]["type"], raw), unknown, "name")


def check_required(args: Mapping[str, Any], spec: Mapping[str, Mapping[str, Any]]) -> None:
    missing = [n for n, p in spec.items() if p["default"] is REQUIRED and n not in args]
    if missing:
        raise ConfigError("missing required pipeline parameter(s): " + ", ".join(f"--param {n}=..." for n in missing))
