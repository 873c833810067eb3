"""jem: Joint Energy-based Models (JEM, JEM++, SADA-JEM) in plain PyTorch.

One obvious module per algorithm: ``models`` (Wide-ResNet, energy), ``samplers`` (SGLD,
proximal SGLD, PYLD), ``buffer`` (replay buffer), ``gmm`` (informative initialisation),
``sam`` (SAM/ASAM), ``objectives`` (the loss), ``train`` (step, loop, checkpoints),
``data`` (batches and augmentation), ``config``/``params`` (variant descriptions),
``metrics`` and ``datasets``.
"""

__version__ = "0.1.0"
