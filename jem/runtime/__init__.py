"""How a run executes and survives: atomic, checksummed checkpoints with every RNG state
(``checkpoint``) and the data-parallel process group (``distributed``). Builds on ``jem.config``."""
