"""The pipeline's plain step functions (`steps`) and the cluster launchers (`launchers`).

KFP components in `components/` are thin shells over `steps`; nothing here imports kfp.
"""
