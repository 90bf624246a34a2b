"""torchrun worker for test_ddp: train/main.py, with a data fault injected on one rank.

    python -m torch.distributed.run ... tests/train/rank_fault.py RANK BATCH [train/main.py arguments]

The loader of rank RANK raises a DataError when asked for its batch number BATCH (counting from 1),
as a shard damaged under one rank would; the other ranks are then waiting in a collective.
"""

from __future__ import annotations

import os
import sys

import pipeline
from pipeline.errors import DataError
from train import main as trainer

FAULT_RANK, FAULT_BATCH = int(sys.argv[1]), int(sys.argv[2])


class FaultyLoader:
    def __init__(self, loader):
        self.loader, self.served = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)  # set_epoch, state_dict, load_state_dict

    def __iter__(self):
        for batch in self.loader:
            self.served += 1
            if self.served == FAULT_BATCH and int(os.environ["RANK"]) == FAULT_RANK:
                raise DataError(
                    f"injected fault: rank {FAULT_RANK}'s shard is damaged at batch {FAULT_BATCH}"
                )
            yield batch


real_build_loader = pipeline.build_loader
pipeline.build_loader = lambda *args, **kwargs: FaultyLoader(real_build_loader(*args, **kwargs))
sys.exit(trainer.main(sys.argv[3:]))
