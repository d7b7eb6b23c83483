import json

import pytest

from components.deploy.component import deploy


def test_a_version_that_was_not_promoted_is_not_deployed(no_services) -> None:
    registration = json.dumps({"promoted": False, "version": "3", "reason": "below the champion"})
    out = json.loads(deploy.python_func(registration=registration, model_name="m", image="img"))
    assert out == {"skipped": True, "reason": "below the champion"}


def test_a_promoted_version_needs_mlflow_to_find_the_champion(no_services) -> None:
    registration = json.dumps({"promoted": True, "version": "3"})
    with pytest.raises(SystemExit, match="^error: no MLflow to read the champion from: set the mlflow_tracking_uri"):
        deploy.python_func(registration=registration, model_name="m", image="img")
