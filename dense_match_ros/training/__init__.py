"""Training of the learned methods: one loop, one checkpoint format, a registry of tasks.

A *task* (see :mod:`.tasks`) says how to build a method's network from its config and how
to compute its loss on a batch of synthetic pairs; everything else (optimiser, schedule,
mixed precision, exact resume, logs, DDP, export of shipped weights) is shared here so that
every later method (DGC-Net, CNNGeo, DMP, ...) gets it by registering a task.
"""
