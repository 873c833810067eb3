"""The methods: the network and its energy (``models``), the samplers (``samplers``), the replay
buffer (``buffer``), informative initialisation (``gmm``), SAM/ASAM (``sam``), the loss
(``objectives``), the training step and loop (``train``), and the reference scripts' iteration
(``reference``). Builds on ``jem.data``, ``jem.runtime`` and ``jem.config``."""
