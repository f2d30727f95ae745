from __future__ import annotations

import pytest
import torch

from methods.queue import MemoryQueue


def _rows(start: int, n: int, dim: int = 4) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1).repeat(1, dim)


def test_init_unit_rows_and_zero_ptr() -> None:
    queue = MemoryQueue(16, 8)
    assert queue.queue.shape == (16, 8)
    torch.testing.assert_close(queue.queue.norm(dim=1), torch.ones(16))
    assert queue.ptr.dtype == torch.long and queue.ptr.item() == 0
    assert set(queue.state_dict()) == {"queue", "ptr"}


def test_enqueue_writes_at_ptr_and_advances() -> None:
    queue = MemoryQueue(8, 4)
    before = queue.queue.clone()
    queue.enqueue(_rows(1, 3))
    torch.testing.assert_close(queue.queue[:3], _rows(1, 3), rtol=0, atol=0)
    torch.testing.assert_close(queue.queue[3:], before[3:], rtol=0, atol=0)
    assert queue.ptr.item() == 3
    queue.enqueue(_rows(10, 2))
    torch.testing.assert_close(queue.queue[3:5], _rows(10, 2), rtol=0, atol=0)
    assert queue.ptr.item() == 5


def test_wrap_around_with_batch_not_dividing_size() -> None:
    queue = MemoryQueue(8, 4)
    queue.enqueue(_rows(0, 5))  # rows 0..4
    queue.enqueue(_rows(100, 5))  # 100..102 -> rows 5..7, 103..104 -> rows 0..1
    expected = torch.stack(
        [_rows(103, 1)[0], _rows(104, 1)[0], _rows(2, 1)[0], _rows(3, 1)[0], _rows(4, 1)[0]]
        + [_rows(100, 1)[0], _rows(101, 1)[0], _rows(102, 1)[0]]
    )
    torch.testing.assert_close(queue.queue, expected, rtol=0, atol=0)
    assert queue.ptr.item() == 2


def test_full_size_write_from_middle_rotates() -> None:
    queue = MemoryQueue(4, 4)
    queue.enqueue(_rows(0, 3))
    queue.enqueue(_rows(10, 4))  # starts at row 3: 10 -> 3, 11 -> 0, 12 -> 1, 13 -> 2
    torch.testing.assert_close(queue.queue[:, 0], torch.tensor([11.0, 12.0, 13.0, 10.0]))
    assert queue.ptr.item() == 3


def test_keys_detached_and_cast_to_queue_dtype() -> None:
    queue = MemoryQueue(4, 2)
    keys = torch.tensor([[0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    queue.enqueue(keys * 1.0)
    assert queue.queue.dtype == torch.float32 and not queue.queue.requires_grad
    torch.testing.assert_close(queue.queue[0], torch.tensor([0.6, 0.8]))


def test_keys_is_a_snapshot() -> None:
    queue = MemoryQueue(4, 2)
    snapshot = queue.keys()
    queue.enqueue(torch.ones(4, 2))
    assert not torch.equal(snapshot, queue.queue)
    torch.testing.assert_close(queue.keys(), torch.ones(4, 2))


def test_bad_shapes_raise() -> None:
    queue = MemoryQueue(4, 2)
    with pytest.raises(ValueError, match="cannot enqueue 5"):
        queue.enqueue(torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        queue.enqueue(torch.zeros(2, 3))
