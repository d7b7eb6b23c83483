"""KFP component: serve the new champion as a KServe InferenceService (runs after register-champion)."""

from kfp import dsl

from components.settings import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def deploy(
    registration: str,
    model_name: str,
    image: str,
    default_image: str = "",
    namespace: str = "",
    service_name: str = "",
    service_account: str = "",
    canary_traffic_percent: int = 100,
    timeout_s: int = 900,
    mlflow_artifacts_destination: str = "",
    mlflow_tracking_uri: str = "",
) -> str:
    """Create or patch the InferenceService serving `models:/model_name@champion` (vembed serve,
    OpenAI /v1/embeddings) and wait for it to be Ready. On failure the previous revision keeps
    serving, the version is tagged `vembed.deployed=false` and this step fails. Skipped when
    `registration` says the version was not promoted. Returns JSON: service, namespace, version,
    endpoint, revision, traffic."""
    import json

    from vembed.pipeline.steps import use_endpoints
    from vembed.pipeline.steps.deploy import deploy as run_deploy
    from vembed.retry import run_step

    reg = json.loads(registration or "{}")
    if not reg.get("promoted"):
        print(f"not deploying: version {reg.get('version')} was not promoted ({reg.get('reason')})")
        return json.dumps({"skipped": True, "reason": reg.get("reason")})

    def attempt() -> dict:
        use_endpoints(mlflow_tracking_uri, mlflow_needed_to="read the champion from")
        return run_deploy(
            model_name, image or default_image, namespace=namespace, service_name=service_name,
            service_account=service_account, canary_traffic_percent=canary_traffic_percent,
            timeout_s=float(timeout_s), mlflow_artifacts_destination=mlflow_artifacts_destination,
        )  # fmt: skip

    result = run_step(attempt, retries=0)  # no retry: the wait for Ready has its own timeout; one line on failure
    print(json.dumps(result, indent=2, default=str))
    return json.dumps(result, default=str)
