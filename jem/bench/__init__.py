"""``jem-bench`` (``cli``): the speed of training iterations and of the FID stage's work (``speed``),
from measured units of work the wall time of every stage of a variant or a table (``stage_times``),
each stage's start-up (``startup``), and the console table and Markdown report of them all
(``markdown``). May use everything else in jem."""
