"""What a run is, as data: what each stage instance reads, resolved (``instances``), the variant
description (``variant``), the stage sections and the schema of the whole params file
(``settings``), how a named variant is resolved from the params file (``params``), and the
one-line errors a user can fix (``errors``). Imports nothing else of jem."""
