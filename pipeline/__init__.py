"""What the stage entry points (``stages/``) share, and what may import DVC and MLflow: reading and
checking ``params.yaml`` and one-line errors (``common``), the MLflow layer (``tracking``) with the
start-up check of the tracking store (``probe``), the journal of calls kept while a tracking server
does not answer (``journal``) and where the runs go (``store``), the files a stage writes
(``outputs``), what ``dvc.yaml`` declares a stage reads (``declared``), the trained weights the
stages after ``train`` read (``weights``), the runner that trains a paper table's variants at once
through ``dvc repro`` processes (``table``), and the fork server each ``python -m stages.<kind>`` hands its
stage to, with the heavy packages imported once (``forkserver``)."""
