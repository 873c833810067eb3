"""jem: Joint Energy-based Models (JEM, JEM++, SADA-JEM) in plain PyTorch.

One package per role, each importing only the ones below it, none importing DVC or MLflow
(``pyproject.toml``'s import-linter contracts check this in ``make test``):

* ``bench``: ``jem-bench``, speed of training, FID and every stage (``cli`` over ``markdown``, over
  ``speed``, ``stage_times``, ``startup``);
* ``report``: the papers' tables, claims, stability and figures from the stages' metrics files
  (``build`` over ``published``, ``tables``, ``claims``, ``figure_set``, over ``runs``, ``render``,
  ``figures``, ``plot_data``);
* ``evaluation``: accuracy/ECE (``metrics``), IS/FID (``inception``), OOD scores (``ood``),
  PGD and BPDA+EOT (``robustness``), the energy landscape (``landscape``);
* ``method``: the model and its training: Wide-ResNet and energy (``models``), SGLD / proximal
  SGLD / PYLD (``samplers``), replay buffer (``buffer``), informative initialisation (``gmm``),
  SAM/ASAM (``sam``), the loss (``objectives``), step, loop and resume (``train``), the
  reference scripts' iteration (``reference``), a whole training run: epochs, validation,
  best weights, checkpoints and divergence recovery (``session``);
* ``data``: datasets (``datasets``), procedural stand-ins (``synthetic``), batches and
  augmentation (``batches``);
* ``runtime``: exact-resume checkpoints (``checkpoint``), process groups (``distributed``);
* ``config``: each stage instance's settings, resolved (``instances``), the variant
  (``variant``), the stage sections and the params schema (``settings``), variant lookup in the
  params file (``params``), one-line errors (``errors``).
"""

__version__ = "0.1.0"
