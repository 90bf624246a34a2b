"""Models: the split encoder, the decoders, the losses and the four methods; `build_method` is the entry."""

from model.config import ModelConfig
from model.encoder import SplitEncoder, SplitOutput
from model.methods import METHODS, VICReg, build_method

__all__ = ["METHODS", "ModelConfig", "SplitEncoder", "SplitOutput", "VICReg", "build_method"]
