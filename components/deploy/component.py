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
    import os

    from vembed.errors import VembedError
    from vembed.steps.deploy import deploy as run_deploy

    reg = json.loads(registration or "{}")
    if not reg.get("promoted"):
        print(f"not deploying: version {reg.get('version')} was not promoted ({reg.get('reason')})")
        return json.dumps({"skipped": True, "reason": reg.get("reason")})
    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise SystemExit("error: no MLflow to read the champion from: set the mlflow_tracking_uri parameter")
    try:
        result = run_deploy(
            model_name,
            image or default_image,
            namespace=namespace,
            service_name=service_name,
            service_account=service_account,
            canary_traffic_percent=canary_traffic_percent,
            timeout_s=float(timeout_s),
            mlflow_artifacts_destination=mlflow_artifacts_destination,
        )
    except VembedError as e:  # one readable line in the pod log, not a traceback
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(result, indent=2, default=str))
    return json.dumps(result, default=str)
