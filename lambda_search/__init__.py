"""lambda_search: choose SimAM's lambda by cross-validation, and trust the answer."""

from ._checkpoint import load_official_checkpoint, map_official_state_dict
from ._models import MODEL_NAMES, BasicBlock, ResNet, build_model
from ._simam import SimAM, check_e_lambda, set_e_lambda, simam

__version__ = "0.1.0"

__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "ResNet",
    "SimAM",
    "build_model",
    "check_e_lambda",
    "load_official_checkpoint",
    "map_official_state_dict",
    "set_e_lambda",
    "simam",
    "__version__",
]
