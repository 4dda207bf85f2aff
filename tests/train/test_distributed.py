"""torchrun support: joining the process group from the environment, rank-0-first blocks."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from dmdr_fast.train import distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, log: str) -> None:
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    assert distributed.init_from_env() == world  # as torchrun would leave the environment
    try:
        assert torch.distributed.get_rank() == rank
        assert distributed.local_device("cpu") == torch.device("cpu")
        with distributed.rank0_first():
            if rank == 0:
                time.sleep(0.5)  # the others must wait for this block to end
            with open(log, "a") as f:
                f.write(f"{rank}\n")
    finally:
        distributed.shutdown()
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_init_from_env_and_rank0_first(tmp_path):
    import torch.multiprocessing as mp

    log = tmp_path / "order.txt"
    mp.spawn(_worker, args=(3, _free_port(), str(log)), nprocs=3, join=True)
    order = log.read_text().split()
    assert order[0] == "0" and sorted(order) == ["0", "1", "2"]


def test_single_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() == 1 and not torch.distributed.is_initialized()
    with distributed.rank0_first():
        pass
    assert distributed.local_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
