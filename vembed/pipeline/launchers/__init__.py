"""Run training where the config says: this pod (`local`) or a Kubeflow job on the cluster.

- `local`: `accelerate launch`, one process per GPU of this pod (vembed.pipeline.launchers.local).
- `trainjob`: a Kubeflow Trainer v2 TrainJob (vembed.pipeline.launchers.trainjob).
- `pytorchjob`: a Training Operator v1 PyTorchJob (vembed.pipeline.launchers.pytorchjob).

The job launchers share one wait/stream/fail/timeout loop (vembed.pipeline.launchers.wait). Inside the
job, vembed.pipeline.launchers.stage brings inputs in and publishes the final adapter. Nothing here imports kfp.
"""
