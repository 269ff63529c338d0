"""Worker for `test_compute_loss_func.py::test_two_processes_match_one_process`.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_loss_func_worker.py OUT_DIR``.
Trains the tiny Llama for two SGD steps (2 examples per process, 2 accumulation steps) with each of
`_loss_func_setup.KINDS`; process 0 writes each run's parameters (``<kind>.pt``) and ``result.json``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402  (sets the offline environment before transformers loads)
import torch  # noqa: E402
from _loss_func_setup import KINDS, train  # noqa: E402
from _torchrun import worker_main, write_result  # noqa: E402


def main(out_dir: str) -> None:
    result: dict[str, object] = {}
    for kind in KINDS:
        trainer = train(kind, "llama", os.path.join(out_dir, kind), 2, 2, 2)
        if trainer.args.process_index == 0:
            torch.save(conftest.flat_parameters(trainer.model), os.path.join(out_dir, f"{kind}.pt"))
            loss_fn = trainer.compute_loss_func or trainer.labo_loss_function
            result[kind] = {"num_processes": trainer.accelerator.num_processes, "fused": loss_fn.last_fused}
    write_result(out_dir, result)


if __name__ == "__main__":
    worker_main(main)
