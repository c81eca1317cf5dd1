"""The networks lambda_search builds, by name, and how people read their names (no torch here:
reading a study needs the labels, not the networks)."""

from __future__ import annotations

__all__ = ["MODEL_NAMES", "MODEL_LABELS"]

MODEL_LABELS = {"resnet20": "ResNet-20", "resnet32": "ResNet-32", "resnet44": "ResNet-44", "resnet56": "ResNet-56",
                "resnet110": "ResNet-110", "resnet18": "ResNet-18"}  # as the paper writes them
MODEL_NAMES = tuple(MODEL_LABELS)
