"""BlockManager: paged KV accounting over a device pool and a host (swap) pool.

Unit tests of each operation, then a hypothesis state machine that drives random
allocate / free / swap_out / swap_in sequences on several requests against a simple model.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from rankserve.core import BlockManager, BlockManagerError, Request


def _req(n: int = 4) -> Request:
    return Request(list(range(n)))


def _all_owned(pool) -> set[int]:
    return {b for b, o in enumerate(pool.owner) if o is not None}


# ---- construction and queries ------------------------------------------------------------------


@pytest.mark.parametrize("args", [(0, 0, 4), (4, -1, 4), (4, 0, 0)])
def test_rejects_bad_sizes(args):
    with pytest.raises(ValueError):
        BlockManager(*args)


def test_fresh_manager_is_all_free():
    bm = BlockManager(10, 3, 4)
    assert bm.num_free_device_blocks == 10
    assert bm.num_free_host_blocks == 3
    assert bm.device_usage == 0.0
    bm.check_invariants([])


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 15, 16, 17, 33])
def test_blocks_for_is_ceil(block_size, tokens):
    bm = BlockManager(64, 0, block_size)
    assert bm.blocks_for(tokens) == -(-tokens // block_size)
    assert bm.blocks_for(0) == 0


# ---- allocate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 16])
def test_allocate_grows_block_table_by_ceil(block_size):
    bm = BlockManager(100, 0, block_size)
    r = _req()
    held = 0
    for tokens in [1, 1, 2, 5, 5, 6, 17, 40, 41, 40, 3]:
        assert bm.allocate(r, tokens)
        held = max(held, -(-tokens // block_size))  # tables never shrink on allocate
        assert len(r.block_table) == held
        assert bm.num_free_device_blocks == 100 - held
        assert bm.extra_blocks_for(r, tokens) == 0
        bm.check_invariants([r])
    assert len(set(r.block_table)) == len(r.block_table)


def test_allocate_hands_out_lowest_ids_first_and_records_owner():
    bm = BlockManager(8, 0, 4)
    a, b = _req(), _req()
    assert bm.allocate(a, 8)
    assert bm.allocate(b, 5)
    assert sorted(a.block_table) == [0, 1]
    assert sorted(b.block_table) == [2, 3]
    assert [bm.device.owner[x] for x in a.block_table] == [a.seq, a.seq]
    assert [bm.device.owner[x] for x in b.block_table] == [b.seq, b.seq]
    assert bm.device_usage == pytest.approx(0.5)


def test_extra_blocks_for():
    bm = BlockManager(10, 0, 4)
    r = _req()
    assert bm.extra_blocks_for(r, 9) == 3
    bm.allocate(r, 4)
    assert bm.extra_blocks_for(r, 9) == 2
    assert bm.extra_blocks_for(r, 3) == 0


def test_allocate_short_returns_false_without_change():
    bm = BlockManager(5, 0, 4)
    a, b = _req(), _req()
    assert bm.allocate(a, 12)  # 3 blocks
    table = list(a.block_table)
    free = list(bm.device.free)
    owner = list(bm.device.owner)
    assert not bm.allocate(b, 9)  # needs 3, 2 free
    assert b.block_table == []
    assert not bm.allocate(a, 24)  # grows to 6 > 5
    assert a.block_table == table
    assert bm.device.free == free and bm.device.owner == owner
    assert bm.num_free_device_blocks == 2
    assert bm.allocate(b, 8)  # exactly what is left
    assert bm.num_free_device_blocks == 0
    bm.check_invariants([a, b])


def test_allocate_refuses_a_swapped_out_request():
    bm = BlockManager(4, 4, 2)
    r = _req()
    bm.allocate(r, 3)
    bm.swap_out(r)
    with pytest.raises(BlockManagerError):
        bm.allocate(r, 5)


# ---- free --------------------------------------------------------------------------------------


def test_free_returns_blocks():
    bm = BlockManager(6, 0, 2)
    a, b = _req(), _req()
    bm.allocate(a, 5)
    bm.allocate(b, 4)
    assert bm.num_free_device_blocks == 1
    bm.free(a)
    assert a.block_table == []
    assert bm.num_free_device_blocks == 4
    bm.check_invariants([a, b])
    bm.free(b)
    assert bm.num_free_device_blocks == 6
    bm.check_invariants([])
    # Freed blocks can be handed out again.
    c = _req()
    assert bm.allocate(c, 12)
    assert sorted(c.block_table) == list(range(6))


def test_free_of_a_request_without_blocks_is_a_no_op():
    bm = BlockManager(3, 0, 2)
    r = _req()
    bm.free(r)
    assert bm.num_free_device_blocks == 3
    bm.check_invariants([r])


def test_double_free_raises():
    bm = BlockManager(4, 0, 2)
    r = _req()
    bm.allocate(r, 4)
    table = list(r.block_table)
    bm.free(r)
    r.block_table = table  # a stale table, as a buggy caller would keep
    with pytest.raises(BlockManagerError):
        bm.free(r)


def test_freeing_someone_elses_blocks_raises():
    bm = BlockManager(4, 0, 2)
    a, b = _req(), _req()
    bm.allocate(a, 4)
    bm.allocate(b, 2)
    b.block_table = list(a.block_table)
    with pytest.raises(BlockManagerError):
        bm.free(b)


def test_freeing_a_block_that_was_never_handed_out_raises():
    bm = BlockManager(4, 0, 2)
    r = _req()
    r.block_table = [3]
    with pytest.raises(BlockManagerError):
        bm.free(r)


def test_free_of_swapped_out_request_returns_host_blocks():
    bm = BlockManager(4, 4, 2)
    r = _req()
    bm.allocate(r, 6)
    bm.swap_out(r)
    assert bm.num_free_host_blocks == 1
    bm.free(r)
    assert not bm.is_on_host(r)
    assert r.block_table == []
    assert bm.num_free_host_blocks == 4 and bm.num_free_device_blocks == 4
    bm.check_invariants([r])
    # Back to a normal device request: it can allocate again.
    assert bm.allocate(r, 2)


# ---- swap --------------------------------------------------------------------------------------


def test_swap_out_and_in_move_blocks_and_return_copy_pairs():
    bm = BlockManager(8, 6, 4)
    other, r = _req(), _req()
    bm.allocate(other, 4)  # takes device block 0, so r's ids differ from the host ids it gets
    bm.allocate(r, 13)  # 4 blocks
    dev_table = list(r.block_table)
    assert bm.can_swap_out(r)

    pairs = bm.swap_out(r)
    assert len(pairs) == len(dev_table) == 4
    assert [s for s, _ in pairs] == dev_table  # sources: the old (device) table, in order
    assert [d for _, d in pairs] == r.block_table  # destinations: the new (host) table, in order
    assert len(set(r.block_table)) == 4
    assert bm.is_on_host(r)
    assert bm.num_free_device_blocks == 8 - 1
    assert bm.num_free_host_blocks == 6 - 4
    assert all(bm.host.owner[b] == r.seq for b in r.block_table)
    assert all(bm.device.owner[b] is None for b in dev_table)
    bm.check_invariants([other, r])

    host_table = list(r.block_table)
    assert bm.allocate(other, 12)  # someone else takes device blocks meanwhile
    pairs = bm.swap_in(r)
    assert len(pairs) == 4
    assert [s for s, _ in pairs] == host_table
    assert [d for _, d in pairs] == r.block_table
    assert not bm.is_on_host(r)
    assert not set(r.block_table) & set(other.block_table)
    assert bm.num_free_device_blocks == 8 - len(other.block_table) - 4
    assert all(bm.device.owner[b] == r.seq for b in r.block_table)
    assert all(bm.host.owner[b] is None for b in host_table)
    bm.check_invariants([other, r])
    # The host blocks are still being copied from until the step runs: free only after end_step.
    assert bm.num_free_host_blocks == 6 - 4
    bm.end_step()
    assert bm.num_free_host_blocks == 6
    bm.check_invariants([other, r])
    # It is a device request again: it can grow.
    assert bm.allocate(r, 16)


def test_host_blocks_swapped_in_from_are_not_reused_before_end_step():
    """Regression: a swap-out in the same step as a swap-in must not be given the host blocks the
    swap-in still copies from (the executor does all swap-outs first)."""
    bm = BlockManager(8, 4, 1)
    a, b = _req(), _req()
    bm.allocate(a, 2)
    bm.swap_out(a)
    bm.allocate(b, 2)
    bm.end_step()
    a_host = list(a.block_table)
    bm.swap_in(a)  # releases a's 2 host blocks ...
    assert not bm.can_swap_out(_with_blocks(bm, 3))  # ... but they are not free yet
    out = bm.swap_out(b)  # 2 blocks: must come from the 2 never used
    assert not {h for _, h in out} & set(a_host)
    bm.check_invariants([a, b])
    bm.end_step()
    assert bm.num_free_host_blocks == 2
    bm.check_invariants([a, b])


def _with_blocks(bm: BlockManager, n: int) -> Request:
    r = _req()
    r.block_table = [0] * n  # only its length matters to can_swap_out
    return r


def test_swap_out_without_host_room_raises_and_changes_nothing():
    bm = BlockManager(8, 2, 4)
    r = _req()
    bm.allocate(r, 12)  # 3 blocks > 2 host blocks
    assert not bm.can_swap_out(r)
    table = list(r.block_table)
    with pytest.raises(BlockManagerError):
        bm.swap_out(r)
    assert r.block_table == table and not bm.is_on_host(r)
    assert bm.num_free_device_blocks == 5 and bm.num_free_host_blocks == 2
    bm.check_invariants([r])


def test_swap_in_without_device_room_raises_and_changes_nothing():
    bm = BlockManager(4, 4, 4)
    r, hog = _req(), _req()
    bm.allocate(r, 12)
    bm.swap_out(r)
    bm.allocate(hog, 8)  # 2 of 4 device blocks left, r needs 3
    host_table = list(r.block_table)
    with pytest.raises(BlockManagerError):
        bm.swap_in(r)
    assert r.block_table == host_table and bm.is_on_host(r)
    bm.check_invariants([r, hog])


def test_swapping_twice_the_same_way_raises():
    bm = BlockManager(4, 4, 4)
    r = _req()
    bm.allocate(r, 5)
    with pytest.raises(BlockManagerError):
        bm.swap_in(r)  # not on the host
    bm.swap_out(r)
    with pytest.raises(BlockManagerError):
        bm.swap_out(r)  # already there
    bm.check_invariants([r])


def test_host_pool_of_zero_blocks():
    bm = BlockManager(4, 0, 4)
    r = _req()
    bm.allocate(r, 1)
    assert not bm.can_swap_out(r)
    with pytest.raises(BlockManagerError):
        bm.swap_out(r)


# ---- check_invariants --------------------------------------------------------------------------


def test_check_invariants_catches_a_leak():
    bm = BlockManager(6, 4, 2)
    a, b = _req(), _req()
    bm.allocate(a, 4)
    bm.allocate(b, 3)
    bm.check_invariants([a, b])
    a.block_table = []  # cleared by hand without free: its 2 blocks are owned by nobody live
    bm.check_invariants()  # the pools alone are still consistent ...
    with pytest.raises(BlockManagerError, match="leak"):
        bm.check_invariants(live=[a, b])  # ... but with the live set the leak shows


def test_check_invariants_catches_a_leak_of_a_forgotten_request():
    bm = BlockManager(6, 4, 2)
    a, b = _req(), _req()
    bm.allocate(a, 4)
    bm.allocate(b, 3)
    bm.swap_out(b)
    with pytest.raises(BlockManagerError, match="leak"):
        bm.check_invariants(live=[a])  # b's host blocks belong to no live request


def test_check_invariants_catches_a_block_in_two_tables():
    bm = BlockManager(6, 0, 2)
    a, b = _req(), _req()
    bm.allocate(a, 4)
    b.block_table = [a.block_table[0]]
    with pytest.raises(BlockManagerError):
        bm.check_invariants(live=[a, b])
    with pytest.raises(BlockManagerError):
        bm.check_invariants(live=[b, a])  # whichever table is visited first


def test_check_invariants_catches_a_block_held_but_not_owned():
    bm = BlockManager(6, 0, 2)
    r = _req()
    bm.allocate(r, 2)
    r.block_table.append(5)  # still on the free list
    with pytest.raises(BlockManagerError):
        bm.check_invariants(live=[r])


def test_check_invariants_catches_broken_pool_bookkeeping():
    bm = BlockManager(4, 0, 2)
    r = _req()
    bm.allocate(r, 2)
    bm.device.free.append(bm.device.free[0])  # a block on the free list twice
    with pytest.raises(BlockManagerError):
        bm.check_invariants()

    bm = BlockManager(4, 0, 2)
    bm.allocate(r, 2)
    bm.device.owner[bm.device.free[0]] = r.seq  # free and owned
    with pytest.raises(BlockManagerError):
        bm.check_invariants()

    bm = BlockManager(4, 0, 2)
    bm.device.free.pop()  # neither free nor owned
    with pytest.raises(BlockManagerError):
        bm.check_invariants()


# ---- random operation sequences ----------------------------------------------------------------

NUM_REQUESTS = 4


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / free / swap_out / swap_in on a few requests, against a model that only
    remembers how many blocks each request holds and in which pool."""

    @initialize(
        device=st.integers(1, 24),
        host=st.integers(0, 24),
        block_size=st.integers(1, 4),
    )
    def setup(self, device, host, block_size):
        self.bm = BlockManager(device, host, block_size)
        self.total = {"device": device, "host": host}
        self.reqs = [_req() for _ in range(NUM_REQUESTS)]
        self.held = [0] * NUM_REQUESTS  # number of blocks in the table
        self.on_host = [False] * NUM_REQUESTS
        self.released = 0  # host blocks swapped in from this step: free again after end_step
        self.released_ids: set[int] = set()

    def _free_model(self, pool: str) -> int:
        want_host = pool == "host"
        held = sum(h for h, oh in zip(self.held, self.on_host) if oh == want_host)
        return self.total[pool] - held - (self.released if want_host else 0)

    @rule(i=st.integers(0, NUM_REQUESTS - 1), tokens=st.integers(0, 12))
    def allocate(self, i, tokens):
        r = self.reqs[i]
        before = list(r.block_table)
        if self.on_host[i]:
            with pytest.raises(BlockManagerError):
                self.bm.allocate(r, tokens)
            assert r.block_table == before
            return
        want = -(-tokens // self.bm.block_size)
        need = max(want - self.held[i], 0)
        ok = self.bm.allocate(r, tokens)
        assert ok == (need <= self._free_model("device"))
        event("allocate ok" if ok else "allocate short")
        if ok:
            self.held[i] += need
            assert r.block_table[: len(before)] == before  # grows at the end only
        else:
            assert r.block_table == before
        assert len(r.block_table) == self.held[i]

    @rule(i=st.integers(0, NUM_REQUESTS - 1), free_again=st.booleans())
    def free(self, i, free_again):
        r = self.reqs[i]
        stale = list(r.block_table)
        was_on_host = self.on_host[i]
        self.bm.free(r)
        assert r.block_table == []
        assert not self.bm.is_on_host(r)
        self.held[i] = 0
        self.on_host[i] = False
        if free_again and stale and not was_on_host:
            # A double free through a stale copy of the table must raise and change nothing.
            r.block_table = stale
            free_before = list(self.bm.device.free)
            with pytest.raises(BlockManagerError):
                self.bm.free(r)
            assert self.bm.device.free == free_before
            r.block_table = []

    def _pick(self, pick, wanted):
        """Mostly pick a request for which the operation makes sense; sometimes any one."""
        eligible = [i for i in range(NUM_REQUESTS) if wanted(i)]
        if eligible and pick % 8:
            return eligible[pick % len(eligible)]
        return pick % NUM_REQUESTS

    @rule(pick=st.integers(0, 63))
    def swap_out(self, pick):
        i = self._pick(pick, lambda j: not self.on_host[j] and self.held[j] > 0)
        r = self.reqs[i]
        old = list(r.block_table)
        assert self.bm.can_swap_out(r) == (self.held[i] <= self._free_model("host"))
        if self.on_host[i] or self.held[i] > self._free_model("host"):
            event("swap_out refused")
            with pytest.raises(BlockManagerError):
                self.bm.swap_out(r)
            assert r.block_table == old
            return
        pairs = self.bm.swap_out(r)
        event("swap_out" + (" (empty)" if not old else ""))
        assert [s for s, _ in pairs] == old
        assert [d for _, d in pairs] == r.block_table
        # Never into host blocks that a swap-in of this step still copies from.
        assert not set(r.block_table) & self.released_ids
        assert len(r.block_table) == self.held[i]
        self.on_host[i] = True

    @rule(pick=st.integers(0, 63))
    def swap_in(self, pick):
        i = self._pick(pick, lambda j: self.on_host[j])
        r = self.reqs[i]
        old = list(r.block_table)
        if not self.on_host[i] or self.held[i] > self._free_model("device"):
            event("swap_in refused")
            with pytest.raises(BlockManagerError):
                self.bm.swap_in(r)
            assert r.block_table == old
            return
        pairs = self.bm.swap_in(r)
        event("swap_in" + (" (empty)" if not old else ""))
        assert [s for s, _ in pairs] == old
        assert [d for _, d in pairs] == r.block_table
        assert len(r.block_table) == self.held[i]
        self.on_host[i] = False
        self.released += len(old)
        self.released_ids |= set(old)

    @rule()
    def end_step(self):
        self.bm.end_step()
        self.released = 0
        self.released_ids = set()

    @invariant()
    def consistent(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check_invariants(live=self.reqs)
        assert self.bm.num_free_device_blocks == self._free_model("device")
        assert self.bm.num_free_host_blocks == self._free_model("host")
        for i, r in enumerate(self.reqs):
            assert self.bm.is_on_host(r) == self.on_host[i]
            assert len(r.block_table) == self.held[i]
            pool = self.bm.host if self.on_host[i] else self.bm.device
            assert all(pool.owner[b] == r.seq for b in r.block_table)
        # No block in two tables of the same pool.
        for pool_name, pool in (("device", self.bm.device), ("host", self.bm.host)):
            tables = [b for i, r in enumerate(self.reqs) if self.on_host[i] == (pool_name == "host")
                      for b in r.block_table]
            assert len(tables) == len(set(tables))
            assert set(tables) == _all_owned(pool)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerStateful = BlockManagerMachine.TestCase
