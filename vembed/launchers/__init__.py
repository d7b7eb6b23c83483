"""Run training where the config says: this pod (`local`) or a Kubeflow job on the cluster.

- `local`: `accelerate launch`, one process per GPU of this pod (vembed.launchers.local).
- `trainjob`: a Kubeflow Trainer v2 TrainJob (vembed.launchers.trainjob).
- `pytorchjob`: a Training Operator v1 PyTorchJob (vembed.launchers.pytorchjob).

The job launchers share one wait/stream/fail/timeout loop (vembed.launchers.wait). Inside the
job, vembed.launchers.stage brings inputs in and publishes the final adapter. Nothing here imports kfp.
"""
