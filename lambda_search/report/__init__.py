"""Layer 7 of 9, the answer: the choice of lambda with its tests (``select``), the tables and
exports (``tables``), Figure 4 (``plot``: data by a pure function, drawn apart) and the final
evaluations as Table 2 shows them (``evaluation``) and drawn (``evaluation_plot``). No torch;
imports ``config``, ``points``, ``nn.registry`` (labels) and ``store``."""
