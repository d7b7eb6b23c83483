"""Keep secrets out of anything that gets stored or printed (MLflow params and tags, logs, reports).

Secrets come only from the environment (or k8s secrets mounted as env); values of the variables below
are removed wherever they appear, as are URL passwords and values of keys named like credentials.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[REDACTED]"
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)
# Key names that hold credentials; `token`/`auth` only as whole words, so `tokenizer` or `author` pass.
_SECRET_NAME = re.compile(
    r"secret|passw|credential|(?<![a-z])token(?![a-z])|(?<![a-z])auth(?![a-z])|(api|access|private)[_-]?key",
    re.I,
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^/\s:@]+:)[^@\s/]+@")


def redact(text: str) -> str:
    """Remove env secret values and URL passwords from a string."""
    for name in SECRET_ENV_VARS:
        if len(secret := os.environ.get(name, "")) >= 4:
            text = text.replace(secret, REDACTED)
    return _URL_PASSWORD.sub(rf"\g<head>{REDACTED}@", text)


def scrub(values: Mapping[str, Any]) -> dict[str, str]:
    """Stringify values for MLflow, dropping anything that looks like a credential."""
    return {
        str(key): REDACTED if _SECRET_NAME.search(str(key))
        else redact(value if isinstance(value, str) else json.dumps(value, default=str))
        for key, value in values.items()
    }
