"""One plain function per pipeline step (prepare, train, evaluate, merge, register).

KFP components in `components/` are thin shells over these; nothing here imports kfp.
"""
