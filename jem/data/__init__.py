"""The images: real datasets and their prepared splits (``datasets``), the procedural stand-ins
the demo and tiny scales use (``synthetic``), and training batches with augmentation
(``batches``). Builds on ``jem.runtime`` and ``jem.config``."""
