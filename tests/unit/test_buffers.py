"""fusefs.buffers: a buffer goes back to the pool only when nothing else refers to it, and a
pooled buffer is handed out only for a read of exactly its size."""

from __future__ import annotations

from fusefs.buffers import BufferPool

SIZE = 1 << 16


def test_an_unshared_buffer_is_reused() -> None:
    pool = BufferPool(SIZE, keep=2)
    buf = pool.take(SIZE)
    ident = id(buf)
    pool.give(buf)
    del buf
    again = pool.take(SIZE)
    assert id(again) == ident and pool.reused == 1
    assert len(pool.take(SIZE)) == SIZE  # the pool is empty now: a new one


def test_a_buffer_still_referenced_elsewhere_is_not_taken() -> None:
    pool = BufferPool(SIZE, keep=4)
    held = bytearray(SIZE)
    queue = [held]  # a write queue, a flight's result...
    pool.give(held)
    view = memoryview(bytearray(SIZE))  # a reply still being sent
    viewed = view.obj  # callers offer a buffer from a variable of theirs (fusefs.buffers.pool)
    pool.give(viewed)
    with_view = bytearray(SIZE)
    mv = memoryview(with_view)[10:20]
    pool.give(with_view)
    assert pool.take(SIZE) is not held and pool.reused == 0
    assert queue and mv.nbytes == 10


def test_only_exact_sizes_and_bytearrays_are_pooled_and_the_pool_is_bounded() -> None:
    pool = BufferPool(SIZE, keep=1)
    pool.give(bytearray(SIZE - 1))
    pool.give(bytes(SIZE))
    assert pool.take(SIZE - 1) is not None and pool.reused == 0
    a, b = bytearray(SIZE), bytearray(SIZE)
    pool.give(a)
    pool.give(b)  # over the bound: dropped
    del a, b
    pool.take(SIZE)
    pool.take(SIZE)
    assert pool.reused == 1
    assert len(pool.take(100)) == 100  # other sizes are always new
