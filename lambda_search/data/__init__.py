"""Layer 2 of 9, the images and their folds: data sets read from their on-disk formats
(``datasets``), stratified folds, holdouts and test splits (``folds``), batched augmentation on
the training device (``augment``). Imports only ``config``."""
