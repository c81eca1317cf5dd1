"""Layer 3 of 9, the networks: SimAM and its CPU kernel (``simam``, ``kernels``), the
networks by name (``registry``, no torch), each family in its own file (``resnet``,
``preresnet``, ``wideresnet``, ``mobilenetv2``), and the official SimAM code's checkpoints
(``official``). Imports only ``config`` and ``data``."""
