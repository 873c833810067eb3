"""What is measured on a trained model: accuracy and calibration (``metrics``), IS and FID
(``inception``), OOD scores and AUROC (``ood``), PGD and BPDA+EOT (``robustness``), the energy
landscape (``landscape``). Builds on ``jem.method``, ``jem.data``, ``jem.runtime`` and ``jem.config``."""
