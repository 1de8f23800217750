"""Paged KV-cache accounting: a device pool and a host (swap) pool of fixed-size blocks.

The block manager only does the bookkeeping. It tells the executor which blocks to copy on swap
(``(src, dst)`` pairs); the engine's executor moves real tensors, the simulator charges PCIe time.
A request's ``block_table`` lists its blocks in order; ``on_host`` says which pool they belong to.
"""

from __future__ import annotations

from rankserve.core.request import Request


class BlockManagerError(RuntimeError):
    """A broken invariant: double free, leak, or a block owned twice."""


class _Pool:
    def __init__(self, name: str, num_blocks: int) -> None:
        self.name = name
        self.num_blocks = num_blocks
        # Reversed so that blocks are handed out lowest id first (easier to read in tests).
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.owner: list[int | None] = [None] * num_blocks

    def take(self, n: int, owner: int) -> list[int]:
        if n > len(self.free):
            raise BlockManagerError(f"{self.name} pool: asked for {n} blocks, {len(self.free)} free")
        taken = self.free[len(self.free) - n :][::-1]
        del self.free[len(self.free) - n :]
        for b in taken:
            self.owner[b] = owner
        return taken

    def give_back(self, blocks: list[int], owner: int) -> None:
        for b in blocks:
            if self.owner[b] != owner:
                raise BlockManagerError(
                    f"{self.name} block {b} freed by request seq {owner} but owned by {self.owner[b]}"
                )
            self.owner[b] = None
        self.free.extend(blocks)


class BlockManager:
    def __init__(self, num_device_blocks: int, num_host_blocks: int = 0, block_size: int = 16) -> None:
        if num_device_blocks < 1 or num_host_blocks < 0 or block_size < 1:
            raise ValueError("need >= 1 device block, >= 0 host blocks and block_size >= 1")
        self.block_size = block_size
        self.device = _Pool("device", num_device_blocks)
        self.host = _Pool("host", num_host_blocks)
        self._on_host: set[int] = set()  # seq of requests whose blocks live in the host pool
        # Host blocks released by swap-ins of the current step: their contents are copied to the
        # device only when the step runs, so no swap-out of the same step may reuse them.
        self._host_released: list[int] = []

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_device_blocks(self) -> int:
        return len(self.device.free)

    @property
    def num_free_host_blocks(self) -> int:
        return len(self.host.free)

    @property
    def device_usage(self) -> float:
        return 1.0 - len(self.device.free) / self.device.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_for(self, req: Request, num_tokens: int) -> int:
        """Device blocks ``req`` still lacks to hold ``num_tokens`` tokens of KV."""
        need = -(-num_tokens // self.block_size) - len(req.block_table)
        return need if need > 0 else 0

    def is_on_host(self, req: Request) -> bool:
        return req.seq in self._on_host

    # ---- changes -------------------------------------------------------------------------
    def allocate(self, req: Request, num_tokens: int) -> bool:
        """Grow ``req``'s device blocks to hold ``num_tokens`` tokens. False (and no change) if short."""
        if req.seq in self._on_host:
            raise BlockManagerError(f"request {req.request_id} is swapped out; swap it in first")
        need = -(-num_tokens // self.block_size) - len(req.block_table)
        if need <= 0:
            return True
        if need > len(self.device.free):
            return False
        req.block_table.extend(self.device.take(need, req.seq))
        return True

    def free(self, req: Request) -> None:
        """Release all of ``req``'s blocks, in whichever pool they are."""
        pool = self.host if req.seq in self._on_host else self.device
        pool.give_back(req.block_table, req.seq)
        self._on_host.discard(req.seq)
        req.block_table = []

    def can_swap_out(self, req: Request) -> bool:
        return len(req.block_table) <= len(self.host.free)

    def swap_out(self, req: Request) -> list[tuple[int, int]]:
        """Move ``req``'s blocks device -> host; returns (device_block, host_block) copy pairs."""
        return self._move(req, self.device, self.host, to_host=True)

    def swap_in(self, req: Request) -> list[tuple[int, int]]:
        """Move ``req``'s blocks host -> device; returns (host_block, device_block) copy pairs."""
        return self._move(req, self.host, self.device, to_host=False)

    def end_step(self) -> None:
        """The step's copies are scheduled: host blocks swapped in from may be reused now."""
        self.host.free.extend(self._host_released)
        self._host_released.clear()

    def _move(self, req: Request, src: _Pool, dst: _Pool, to_host: bool) -> list[tuple[int, int]]:
        if (req.seq in self._on_host) == to_host:
            raise BlockManagerError(
                f"request {req.request_id} is already in the {dst.name} pool"
            )
        old = req.block_table
        new = dst.take(len(old), req.seq)
        src.give_back(old, req.seq)
        if not to_host:
            # Hold them back until end_step (see _host_released). Device blocks freed by a
            # swap-out need no such care: executors copy all swap-outs before any swap-in.
            del src.free[len(src.free) - len(old) :]
            self._host_released.extend(old)
        req.block_table = new
        if to_host:
            self._on_host.add(req.seq)
        else:
            self._on_host.discard(req.seq)
        return list(zip(old, new))

    # ---- self-check ----------------------------------------------------------------------
    def check_invariants(self, live: list[Request] | None = None) -> None:
        """Raise BlockManagerError unless every block is free or owned exactly once.

        With ``live`` (every request that may hold blocks) it also proves there is no leak:
        the owned blocks are exactly the union of those requests' block tables.
        """
        for pool in (self.device, self.host):
            free = pool.free + (self._host_released if pool is self.host else [])
            if len(set(free)) != len(free):
                raise BlockManagerError(f"{pool.name} free list holds a block twice")
            for b in free:
                if pool.owner[b] is not None:
                    raise BlockManagerError(f"{pool.name} block {b} is free and owned")
            owned = sum(o is not None for o in pool.owner)
            if owned + len(free) != pool.num_blocks:
                raise BlockManagerError(f"{pool.name} pool lost blocks: neither free nor owned")
        if live is None:
            return
        claimed = {"device": {}, "host": {}}
        for req in live:
            pool = self.host if req.seq in self._on_host else self.device
            for b in req.block_table:
                if b in claimed[pool.name]:
                    raise BlockManagerError(f"{pool.name} block {b} in two block tables")
                if pool.owner[b] != req.seq:
                    raise BlockManagerError(f"{pool.name} block {b} not owned by {req.request_id}")
                claimed[pool.name][b] = req.seq
        for pool in (self.device, self.host):
            leaked = [b for b, o in enumerate(pool.owner) if o is not None and b not in claimed[pool.name]]
            if leaked:
                raise BlockManagerError(f"{pool.name} blocks leaked: {leaked[:10]}")
