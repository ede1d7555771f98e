"""`kdfast distill` with a KD method that raises on rank 1 at its second epoch: the program that
tests/test_distributed_distill.py starts on two ranks to check that a failing rank ends them all."""

import sys

import torch.distributed as dist

from kdfast.cli import main
from kdfast.methods import base
from tests.test_train import L2Pull


class FailsOnRank1(L2Pull):
    name = "fails-on-rank-1"

    def start_epoch(self, epoch, max_epoch, student_user, student_item):
        if epoch == 1 and dist.get_rank() == 1:
            raise RuntimeError("this method fails on rank 1")
        super().start_epoch(epoch, max_epoch, student_user, student_item)


base.METHODS["fails-on-rank-1"] = ("tests._distill_rank_fails:FailsOnRank1", {"lam": 0.5})

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
