"""``jem-bench`` (``cli``): the speed of training iterations, of the FID stage's work and, from
measured units of work, of every stage of a variant or a table (``stage_times``). May use
everything else in jem."""
