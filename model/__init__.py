"""Models: the split encoder, the decoders, the losses and the four methods; `build_method` is the entry."""

from model.config import ModelConfig
from model.encoder import SplitEncoder, SplitOutput
from model.methods import METHODS, Method, build_method

__all__ = ["METHODS", "Method", "ModelConfig", "SplitEncoder", "SplitOutput", "build_method"]
