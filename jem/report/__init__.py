"""The report: the papers' tables, claims, stability and figures built from the metrics and plot files
the stages wrote (pandas, matplotlib; no DVC, no MLflow).

A run is a variant trained with one seed (``variants`` x ``seeds``); every number below is over
a variant's seeds. Tables (Markdown, CSV and LaTeX, one set per table, plus ``README.md`` with all
of them):

* every table in ``reports/published.yaml`` (SADA-JEM Tables 1, 2, 3, 5, 6 and its ECE figures;
  JEM++ Tables 2, 3, 4, 5, its OOD and ECE tables): per row our value (``mean ± std (n)`` over
  seeds when n > 1, each seed's value in the CSV), the published value, and at the paper scale the
  difference where ours and the paper's were measured the same way (no ``measured`` note on the
  row or its table, and IS/FID under the protocol the paper states), marked ``†`` when it lies
  outside two standard deviations of ours. At the demo and tiny scales there is no difference
  column: the published numbers stand beside ours as a reference. What a row's published number
  means (``note``, ``measured`` in ``published.yaml``) is a numbered footnote under its table, each
  said once. A row whose variant did not run is ``not run``; a run that diverged with recovery
  off, ``diverged at epoch e``;
* ``summary`` (every variant that ran), ``robustness`` (PGD and BPDA+EOT accuracy per radius; the
  papers publish these as a figure only);
* ``stability``: per variant, runs with a divergence of all its runs, divergence events per 1,000
  iterations, the first divergence's epoch and the signals that fired (``train`` metrics);
* ``claims``: the papers' comparative claims (``reports/claims.yaml``, ``jem.report.claims``), each
  holds / does not hold / not run / not measured on these runs, with both sides' numbers, their
  spread and the seeds in which it holds.

Where each number comes from (``<metrics>/<stage>/<variant>/seed<seed>.json``):

* accuracy, ECE, OOD AUROC: ``eval`` (stage ``evaluate@<variant>-<seed>``);
* IS, FID: ``fid`` (stage ``fid@<variant>-<seed>``, replay-buffer samples), under the row's
  ``protocol`` (how the paper selected the images, when known) or else the family's
  (``fid.protocol``), the other protocols' numbers in the CSV;
* run time and divergence events: ``train`` (stage ``train@<variant>-<seed>``);
* robustness: ``robustness`` (stage ``robustness@<variant>-<seed>``).

Figures (PNG, ``figures/``, from each variant's first seed): learning curves, reliability
diagrams, OOD score histograms, robustness curves, energy landscapes (shared and per-model
y-axis) and sample grids.

The modules, by role: ``runs`` (every run's metrics, our value of a column per seed), ``published``
(the papers' tables beside ours), ``tables`` (summary, robustness, stability), ``claims``, ``render``
(a table as CSV, LaTeX and Markdown), ``figure_set`` (the report's figures; ``figures`` draws them),
``plot_data`` (the data series ``dvc plots`` overlays) and ``build`` (the whole report into one
folder). This ``__init__`` imports none of them: the stages that only draw (``figures``) or write
data series (``plot_data``) start without the report's tables.
"""
