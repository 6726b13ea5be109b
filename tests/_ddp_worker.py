"""A data-parallel search that `tests/test_distributed.py` starts under torchrun (every rank
runs this file): the process group is the script's own, as in a user's training script.

    python -m torch.distributed.run --standalone --nproc-per-node 2 _ddp_worker.py MODEL DATA OUT COPY

1. `optimize` is interrupted after search epoch 1 (a callback raises on every rank);
2. rank 0 copies the checkpoint folder to COPY (for the test's resume with one process);
3. `optimize` again, the same options: the run resumes on the same ranks and finishes.
With ``PLINIO_ONNX_RANK_DUMP`` set, every rank dumps its final state there.
"""
import shutil
import sys

import torch.distributed as dist

from plinio_onnx.optimize import optimize

OPTIONS = dict(epochs=2, warmup_epochs=1, finetune_epochs=1, target_params="50%", batch_size=64, quiet=True)


class Interrupted(Exception):
    """Raised by the callback after search epoch 1."""


def interrupt(phase: str, epoch: int, info: dict) -> None:
    if phase == "search" and epoch == 1:
        raise Interrupted


def main(model: str, data: str, output: str, copy: str) -> None:
    dist.init_process_group("gloo")
    try:
        optimize(model, data, output=output, callback=interrupt, **OPTIONS)
    except Interrupted:
        pass
    else:
        raise SystemExit("the search was not interrupted")
    if dist.get_rank() == 0:
        shutil.copytree(output.removesuffix(".onnx") + ".ckpt", copy)
    dist.barrier()
    optimize(model, data, output=output, **OPTIONS)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
