"""How a run executes and survives: atomic, checksummed checkpoints with every RNG state
(``checkpoint``), the data-parallel process group (``distributed``), and the one atomic file writer
and JSON reader every file goes through (``files``, without torch). Builds on ``jem.config``."""
