"""The InferenceService launcher's wait, against the loopback fake Kubernetes API (tests/support/fake_k8s.py:
no API server can run here); no MLflow needed."""

from __future__ import annotations

import pytest

from tests.support.fake_k8s import fake_kube
from vembed.pipeline.launchers.inference_service import (
    DeployError,
    InferenceServices,
    PredictorSpec,
    custom_objects_api,
)

SPEC = PredictorSpec(image="img", storage_uri="s3://b/m", model_uri="models:/m/1")


def test_wait_rides_out_failed_polls_but_not_a_run_of_them():
    with fake_kube(isvc_ready_after=3) as fake:
        services = InferenceServices(custom_objects_api(fake.configuration()), "ml")
        assert services.apply("svc", SPEC, 100)[0] == "created"
        fake.isvc_get_errors = 2  # the API server restarts while the revision comes up
        ready, reason, obj = services.wait_ready("svc", timeout_s=60, poll_s=0.01)
        assert ready and reason == "ready" and obj["status"]["components"]["predictor"]["latestReadyRevision"]

        fake.isvc_get_errors = 100  # the API server is gone: one line naming the service, not a timeout
        with pytest.raises(DeployError, match=r"InferenceService ml/svc: HTTP 503") as err:
            services.wait_ready("svc", timeout_s=60, poll_s=0.01)
        assert "\n" not in str(err.value)


def test_an_api_server_that_never_answers_is_a_bounded_wait(monkeypatch):
    import socket

    from kubernetes.client import Configuration

    from vembed.pipeline.launchers import inference_service

    monkeypatch.setattr(inference_service, "REQUEST_TIMEOUT_S", (1.0, 0.2))  # the default read timeout is 30 s
    with socket.create_server(("127.0.0.1", 0)) as hung:  # connections queue up; no reply ever comes
        services = InferenceServices(custom_objects_api(Configuration(host=f"http://127.0.0.1:{hung.getsockname()[1]}")), "ml")
        with pytest.raises(DeployError, match=r"InferenceService ml/svc: .*[Tt]imed out") as err:
            services.wait_ready("svc", timeout_s=0.1, poll_s=0.01)
    assert "\n" not in str(err.value)
