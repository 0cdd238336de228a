"""The site-local text queue: FIFO order, capacity, detachment."""

from __future__ import annotations

import pytest
import torch

from fedmri.align import TextQueue
from fedmri.errors import ConfigError


def _rows(start: int, n: int, dim: int = 3) -> torch.Tensor:
    return torch.arange(start, start + n).float()[:, None].expand(n, dim).clone()


def test_fills_then_overwrites_the_oldest_first() -> None:
    q = TextQueue(size=5, dim=3)
    q.enqueue(_rows(0, 3))
    assert len(q) == 3 and q.get()[:, 0].tolist() == [0, 1, 2]
    q.enqueue(_rows(3, 4))  # 7 seen, capacity 5: 0 and 1 are gone
    assert len(q) == 5 and q.get()[:, 0].tolist() == [2, 3, 4, 5, 6]


def test_a_batch_larger_than_the_queue_keeps_its_newest_rows() -> None:
    q = TextQueue(size=3, dim=3)
    q.enqueue(_rows(0, 7))
    assert q.get()[:, 0].tolist() == [4, 5, 6]


def test_entries_are_detached_and_reset_empties() -> None:
    q = TextQueue(size=4, dim=3)
    feats = _rows(0, 2).requires_grad_()
    q.enqueue(feats * 2)
    assert not q.get().requires_grad
    q.reset()
    assert len(q) == 0 and q.get().shape == (0, 3)


def test_queue_is_not_a_parameter_holder() -> None:
    assert list(TextQueue(4, 3).parameters()) == []


def test_wrong_width_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected text features"):
        TextQueue(4, 3).enqueue(torch.zeros(2, 5))


@pytest.mark.parametrize("size, dim", [(0, 3), (4, 0)])
def test_bad_sizes_are_config_errors(size: int, dim: int) -> None:
    with pytest.raises(ConfigError):
        TextQueue(size, dim)
