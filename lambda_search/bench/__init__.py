"""Layer 6 of 9, timing: the search's own step measured (``measure``: the pack size "auto" picks
on a GPU, the start-up projection, the engines a worker reuses), a study's wall time from its
step times (``projection``), and the reference pipeline with the speed report (``run``, loaded
by the CLI's bench command only). Imports the layers up to ``train``."""
