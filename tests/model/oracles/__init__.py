"""Faithful transcriptions of the official DINO, iBOT and DINOv2 code: the oracles the product's
losses, heads and masking are tested against (tests/model/test_dino.py). Test code only; the product
(model/dino.py) is written independently. Each file names its source repository, path and commit."""
