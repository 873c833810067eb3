"""jem: Joint Energy-based Models (JEM, JEM++, SADA-JEM) in plain PyTorch.

One package per role, each importing only the ones below it (``pyproject.toml``'s
import-linter contracts check this in ``make test``):

* ``bench``: ``jem-bench``, speed of training, FID and every stage (``cli``, ``stage_times``);
* ``evaluation``: accuracy/ECE (``metrics``), IS/FID (``inception``), OOD scores (``ood``),
  PGD and BPDA+EOT (``robustness``), the energy landscape (``landscape``);
* ``method``: the model and its training: Wide-ResNet and energy (``models``), SGLD / proximal
  SGLD / PYLD (``samplers``), replay buffer (``buffer``), informative initialisation (``gmm``),
  SAM/ASAM (``sam``), the loss (``objectives``), step, loop and resume (``train``), the
  reference scripts' iteration (``reference``);
* ``data``: datasets (``datasets``), procedural stand-ins (``synthetic``), batches and
  augmentation (``batches``);
* ``runtime``: exact-resume checkpoints (``checkpoint``), process groups (``distributed``);
* ``config``: each stage instance's settings, resolved (``instances``), the variant
  (``variant``), the stage sections and the params schema (``settings``), variant lookup in the
  params file (``params``), one-line errors (``errors``).
"""

__version__ = "0.1.0"
