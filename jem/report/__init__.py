"""The report: the papers' tables, claims, stability and figures built from the metrics and plot files
the stages wrote (pandas, matplotlib; no DVC, no MLflow)."""
