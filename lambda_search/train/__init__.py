"""Layer 4 of 9, training one (lambda, fold), alone or packed: the engine (a network on a
device and its step), the fold state machine (``foldrun``: checkpoints, epochs, the result),
single (``single``) and packed (``packnet``, ``packstep``, ``pack``) trainings, how a point's folds
run (``groups``), the numerics a fold records, and a study's plan with one point's run
(``plan``). Never imports Optuna; imports ``config``, ``points``, ``data`` and ``nn``."""
