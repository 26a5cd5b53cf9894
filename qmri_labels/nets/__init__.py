"""Network backbones: plain ``torch.nn.Module`` classes, free of training logic."""

from qmri_labels.nets.mlp import ACTIVATIONS, MLP, OUTPUT_MAPPINGS, BoundedOutput

__all__ = ["ACTIVATIONS", "OUTPUT_MAPPINGS", "MLP", "BoundedOutput"]
