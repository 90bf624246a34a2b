"""torchrun worker for test_ddp: train/main.py's own build + train, then save this rank's parameters.

python -m torch.distributed.run ... tests/train/ddp_worker.py OUT_DIR [train/main.py arguments]
"""

from __future__ import annotations

import sys

import torch

from train.distributed import init_distributed, unwrap
from train.loop import train
from train.main import build, parse_config, resolve_data

out, argv = sys.argv[1], sys.argv[2:]
cfg = parse_config(argv)
env = init_distributed(cfg.run.device)
resolve_data(cfg, env)
model, optimizer, scheduler, loader = build(cfg, env)
first = {k: v.detach().clone() for k, v in unwrap(model).named_parameters()}
train(cfg, model, optimizer, scheduler, loader, env)
last = {k: v.detach() for k, v in unwrap(model).named_parameters()}
torch.save({"first": first, "last": last}, f"{out}/rank{env.rank}.pt")
