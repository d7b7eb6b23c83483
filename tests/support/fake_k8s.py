"""A small stand-in for the Kubernetes API server (plus the Trainer / Training Operator controllers).

Why a stand-in: no Kubernetes API server can run in this environment (no kind, k3s or envtest
binaries, no container runtime), and the launchers only reach Kubernetes through the official
clients. So this plays, over real HTTP on loopback, exactly the REST calls those clients make:

  GET  /api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public   (SDK version probe)
  GET  /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainingruntimes/R    (404: none namespaced)
  GET  /apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes/R
  POST /apis/GROUP/VERSION/namespaces/NS/PLURAL                                 create a job
  GET  /apis/GROUP/VERSION/namespaces/NS/PLURAL/NAME                            job with its status
  DELETE /apis/GROUP/VERSION/namespaces/NS/PLURAL/NAME
  GET  /api/v1/namespaces/NS/pods?labelSelector=...                             the job's node-0 pod
  GET  /api/v1/namespaces/NS/pods/POD/log                                       its log

A job moves through `phases` (one step per GET of the job, the last one sticks), which is all the
"controller" there is: Pending -> Running -> Succeeded | Failed. Anything else answers 404.

KServe InferenceServices (serving.kserve.io/v1beta1, the deploy step) are played the same way:

  POST  /apis/serving.kserve.io/v1beta1/namespaces/NS/inferenceservices          create
  GET   .../inferenceservices/NAME                                                object with status
  PATCH .../inferenceservices/NAME   (application/merge-patch+json)               update
  PUT   .../inferenceservices/NAME                                                replace

Every spec change makes a new revision (NAME-predictor-0000N), as Knative does. Each new revision
takes the next entry of `isvc_outcomes` ("ready", "fail" or "pending"; "ready" once they run out)
and reaches it after `isvc_ready_after` GETs. A ready revision takes `canaryTrafficPercent` of the
traffic (the previous ready revision keeps the rest); a failed one takes none, and the previous
ready revision keeps serving, as in Knative. `isvc_get_errors` makes the next N GETs of an existing
InferenceService answer 503, as an API server that is restarting does.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

NOW = "2025-01-01T00:00:00Z"
RUNTIME_IMAGE = "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime"

# The torch-distributed ClusterTrainingRuntime as Kubeflow Trainer installs it (trimmed to what the SDK reads).
TORCH_RUNTIME = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1",
    "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
        "template": {
            "spec": {
                "replicatedJobs": [
                    {
                        "name": "node",
                        "template": {
                            "metadata": {
                                "labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
                            },
                            "spec": {
                                "template": {
                                    "spec": {"containers": [{"name": "node", "image": RUNTIME_IMAGE}]}
                                }
                            },
                        },
                    }
                ]
            }
        },
    },
}

KINDS = {
    # plural: (group/version, node-0 container, pod label selector key for the job name)
    "trainjobs": ("trainer.kubeflow.org/v1alpha1", "node", "jobset.sigs.k8s.io/jobset-name"),
    "pytorchjobs": ("kubeflow.org/v1", "pytorch", "training.kubeflow.org/job-name"),
}


@dataclass
class FakeKube:
    phases: list[str] = field(default_factory=lambda: ["Pending", "Running", "Succeeded"])
    log_lines: list[str] = field(default_factory=list)
    failure: tuple[str, str] = ("JobFailed", "node-0 exited with an error")  # condition reason, message
    exit_code: tuple[int, str] = (137, "OOMKilled")  # node-0 container's end on Failed
    runtimes: dict[str, dict[str, Any]] = field(default_factory=lambda: {"torch-distributed": TORCH_RUNTIME})
    created: list[dict[str, Any]] = field(default_factory=list)  # request bodies, as sent
    deleted: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)  # "METHOD path"
    on_create: Any = None  # called with each created body (outside the lock): plays the job's pods
    url: str = ""
    isvc_outcomes: list[str] = field(default_factory=list)
    isvc_ready_after: int = 1
    isvc_get_errors: int = 0
    isvcs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"obj", "revisions"}
    _jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"plural", "obj", "step"}
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- what a real cluster would compute

    def _phase(self, name: str, advance: bool) -> str:
        job = self._jobs[name]
        if advance:
            job["step"] = min(job["step"] + 1, len(self.phases) - 1)
        return self.phases[max(job["step"], 0)]

    def _status(self, plural: str, phase: str) -> dict[str, Any]:
        def cond(type_: str, reason: str = "", message: str = "") -> dict[str, Any]:
            return {
                "type": type_,
                "status": "True",
                "reason": reason or type_,
                "message": message or type_,
                "lastTransitionTime": NOW,
                "lastUpdateTime": NOW,
            }

        if plural == "trainjobs":  # TrainJob: Complete/Failed conditions; Running comes from the pods
            if phase == "Succeeded":
                return {"conditions": [cond("Complete")]}
            if phase == "Failed":
                return {"conditions": [cond("Failed", *self.failure)]}
            return {}
        conditions = [cond("Created")]
        if phase in ("Running", "Succeeded", "Failed"):
            conditions.append(cond("Running"))
        if phase == "Succeeded":
            conditions.append(cond("Succeeded"))
        if phase == "Failed":
            conditions.append(cond("Failed", *self.failure))
        return {"conditions": conditions}

    def _pod(self, name: str, plural: str, phase: str) -> dict[str, Any]:
        _, container, name_label = KINDS[plural]
        if plural == "trainjobs":
            pod_name = f"{name}-node-0-0-abcde"
            labels = {
                name_label: name,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "batch.kubernetes.io/job-completion-index": "0",
            }
        else:
            pod_name = f"{name}-master-0"
            labels = {
                name_label: name,
                "training.kubeflow.org/job-role": "master",
                "training.kubeflow.org/replica-type": "master",
                "training.kubeflow.org/replica-index": "0",
            }
        state: dict[str, Any] = {"running": {"startedAt": NOW}}
        if phase == "Pending":
            state = {"waiting": {"reason": "ContainerCreating"}}
        elif phase == "Failed":
            state = {"terminated": {"exitCode": self.exit_code[0], "reason": self.exit_code[1]}}
        elif phase == "Succeeded":
            state = {"terminated": {"exitCode": 0, "reason": "Completed"}}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": "", "labels": labels, "creationTimestamp": NOW},
            "spec": {"containers": [{"name": container, "image": "img"}]},
            "status": {
                "phase": phase,
                "containerStatuses": [
                    {
                        "name": container,
                        "image": "img",
                        "imageID": "",
                        "ready": True,
                        "restartCount": 0,
                        "state": state,
                    }
                ],
            },
        }

    # -- HTTP

    def handle(self, method: str, raw_path: str, body: bytes) -> tuple[int, Any]:
        url = urlparse(raw_path)
        path, query = url.path, parse_qs(url.query)
        with self._lock:
            self.calls.append(f"{method} {path}" + ("?watch" if query.get("watch") == ["true"] else ""))
            if m := re.fullmatch(
                r"/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public", path
            ):
                return 200, {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "data": {"kubeflow_trainer_version": "2.1.0"},
                }
            if m := re.fullmatch(
                r"/apis/trainer\.kubeflow\.org/v1alpha1/clustertrainingruntimes/([^/]+)", path
            ):
                runtime = self.runtimes.get(m.group(1))
                return (200, runtime) if runtime else _not_found(m.group(1))
            if m := re.fullmatch(r"/apis/serving\.kserve\.io/v1beta1/namespaces/([^/]+)/inferenceservices(?:/([^/]+))?", path):
                return self._isvc(method, m.group(1), m.group(2), json.loads(body) if body else None)
            if m := re.fullmatch(r"/apis/[^/]+/[^/]+/namespaces/([^/]+)/(trainjobs|pytorchjobs)", path):
                return (
                    self._create(m.group(1), m.group(2), json.loads(body))
                    if method == "POST"
                    else _not_found("")
                )
            if m := re.fullmatch(r"/apis/[^/]+/[^/]+/namespaces/[^/]+/(trainjobs|pytorchjobs)/([^/]+)", path):
                name = m.group(2)
                if name not in self._jobs:
                    return _not_found(name)
                if method == "DELETE":
                    self.deleted.append(name)
                    del self._jobs[name]
                    return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
                obj = dict(self._jobs[name]["obj"])
                obj["status"] = self._status(m.group(1), self._phase(name, advance=True))
                return 200, obj
            if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", path):
                return 200, {"apiVersion": "v1", "kind": "PodList", "items": self._pods(query)}
            if m := re.fullmatch(r"/api/v1/namespaces/[^/]+/pods/([^/]+)/log", path):
                return 200, "".join(f"{line}\n" for line in self.log_lines)
        return _not_found(path)

    def _create(self, namespace: str, plural: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.created.append(body)
        name = body["metadata"]["name"]
        obj = json.loads(json.dumps(body))
        obj["metadata"].update(namespace=namespace, creationTimestamp=NOW, uid=f"uid-{name}")
        self._jobs[name] = {"plural": plural, "obj": obj, "step": -1}
        return 201, obj

    # -- InferenceServices

    def _isvc(self, method: str, namespace: str, name: str | None, body: Any) -> tuple[int, Any]:
        if name is None:
            if method != "POST":
                return _not_found("")
            name = body["metadata"]["name"]
            if name in self.isvcs:
                return 409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                             "message": f"{name} already exists", "code": 409}  # fmt: skip
            self.created.append(body)
            obj = json.loads(json.dumps(body))
            obj["metadata"].update(namespace=namespace, creationTimestamp=NOW, uid=f"uid-{name}", generation=0)
            self.isvcs[name] = {"obj": obj, "revisions": []}
            self._new_revision(name)
            return 201, self._isvc_view(name, advance=False)
        if name not in self.isvcs:
            return _not_found(name)
        entry = self.isvcs[name]
        if method == "GET":
            if self.isvc_get_errors:
                self.isvc_get_errors -= 1
                return 503, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable",
                             "message": "the server is currently unable to handle the request", "code": 503}  # fmt: skip
            return 200, self._isvc_view(name, advance=True)
        if method in ("PATCH", "PUT"):
            old_spec = json.dumps(entry["obj"]["spec"], sort_keys=True)
            if method == "PATCH":
                entry["obj"] = _merge_patch(entry["obj"], body)
            else:
                body = {k: v for k, v in body.items() if k != "status"}
                entry["obj"] = {**body, "metadata": {**entry["obj"]["metadata"], **body.get("metadata", {})}}
            if json.dumps(entry["obj"]["spec"], sort_keys=True) != old_spec:
                self._new_revision(name)
            return 200, self._isvc_view(name, advance=False)
        return _not_found(name)

    def _new_revision(self, name: str) -> None:
        entry = self.isvcs[name]
        entry["obj"]["metadata"]["generation"] += 1
        outcome = self.isvc_outcomes.pop(0) if self.isvc_outcomes else "ready"
        n = len(entry["revisions"]) + 1
        entry["revisions"].append({"name": f"{name}-predictor-{n:05d}", "outcome": outcome, "gets": 0})

    def _isvc_view(self, name: str, advance: bool) -> dict[str, Any]:
        entry = self.isvcs[name]
        obj = json.loads(json.dumps(entry["obj"]))
        latest = entry["revisions"][-1]
        if advance:
            latest["gets"] += 1
        settled = latest["gets"] >= self.isvc_ready_after
        ready = [r for r in entry["revisions"] if r["outcome"] == "ready" and (r is not latest or settled)]
        latest_ready = ready[-1]["name"] if ready else None
        previous_ready = ready[-2]["name"] if len(ready) > 1 else None
        canary = obj["spec"]["predictor"].get("canaryTrafficPercent")
        if latest_ready == latest["name"] and previous_ready and canary is not None:
            traffic = [
                {"revisionName": latest_ready, "percent": canary, "latestRevision": True, "tag": "latest"},
                {"revisionName": previous_ready, "percent": 100 - canary, "latestRevision": False, "tag": "prev"},
            ]
        else:
            traffic = [{"revisionName": latest_ready, "percent": 100, "latestRevision": latest_ready == latest["name"]}] if latest_ready else []

        def cond(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
            return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": NOW}

        if latest["outcome"] == "fail" and settled:
            msg = f"Revision {latest['name']} failed with message: container exited with code 1"
            conditions = [cond("PredictorReady", "False", "RevisionFailed", msg), cond("Ready", "False", "RevisionFailed", msg)]
        elif latest_ready == latest["name"]:
            conditions = [cond("PredictorReady", "True"), cond("Ready", "True")]
        else:
            conditions = [cond("PredictorReady", "Unknown", "RevisionPending", "waiting for the revision"),
                          cond("Ready", "Unknown", "RevisionPending", "waiting for the revision")]
        obj["status"] = {
            "observedGeneration": obj["metadata"]["generation"],
            "url": f"http://{name}.{obj['metadata']['namespace']}.example.com",
            "conditions": conditions,
            "components": {"predictor": {
                "latestCreatedRevision": latest["name"],
                "latestReadyRevision": latest_ready,
                "traffic": traffic,
            }},
        }  # fmt: skip
        return obj

    def _pods(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        selector = (query.get("labelSelector") or [""])[0]
        for name, job in self._jobs.items():
            _, _, name_label = KINDS[job["plural"]]
            if re.search(rf"{re.escape(name_label)}={re.escape(name)}(,|$)", selector):
                return [self._pod(name, job["plural"], self._phase(name, advance=False))]
        return []

    def configuration(self):
        from kubernetes.client import Configuration

        cfg = Configuration(host=self.url)
        cfg.verify_ssl = False
        return cfg

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig for this server, for code that finds its cluster itself (KUBECONFIG), e.g. a
        pipeline step running in a kfp.local subprocess."""
        import yaml

        ctx = {"cluster": "fake", "user": "fake", "namespace": namespace}
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "fake", "context": ctx}],
        }))  # fmt: skip
        return path


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what `application/merge-patch+json` means to the API server)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _not_found(what: str) -> tuple[int, Any]:
    return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                 "message": f"{what} not found", "code": 404}  # fmt: skip


@contextmanager
def fake_kube(**kwargs: Any) -> Iterator[FakeKube]:
    """Start a FakeKube on 127.0.0.1 (a free port) in a thread; stop it afterwards."""
    fake = FakeKube(**kwargs)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            status, payload = fake.handle(self.command, self.path, self.rfile.read(length) if length else b"")
            if self.command == "POST" and status == 201 and fake.on_create is not None:
                try:
                    fake.on_create(payload)
                except Exception as e:  # the "pods" crashed: the job fails with that as its reason
                    fake.phases, fake.failure = ["Failed"], ("PodError", f"{type(e).__name__}: {e}")
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _serve

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-kube", daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
