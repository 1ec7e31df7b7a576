"""Training at scale: mesh and sharding rules, optimizer, train step, checkpoints, metrics.

`experiments/train.py` wires these pieces together; each file here is a small functional piece
that works on params pytrees and can be tested on its own.
"""
