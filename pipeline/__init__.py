"""What the stage entry points (``stages/``) share, and what may import DVC and MLflow: reading and
checking ``params.yaml`` and one-line errors (``common``), the MLflow layer (``tracking``), the files a
stage writes (``outputs``), what ``dvc.yaml`` declares a stage reads (``declared``), the trained
weights the stages after ``train`` read (``weights``) and the runner that trains a paper table's
variants at once through ``dvc repro`` processes (``table``)."""
