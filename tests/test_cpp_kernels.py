"""The C++ kernels (rankserve.model.cpp_kernels): decode attention against SDPA, the fused elementwise
ops against torch's, bad input, and the build."""

from __future__ import annotations

import os
import threading
import time

import pytest

torch = pytest.importorskip("torch")

from rankserve.model import cpp_kernels

F = torch.nn.functional


@pytest.fixture(scope="module")
def built():
    if not cpp_kernels.load():
        pytest.skip("the extension cannot be built here (no C++ compiler or ninja)")


def _case(batch, lengths, dtype, kv=2, group=3, dim=16, block_size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-max(lengths) // block_size)
    pool_blocks = batch * per_seq + 5
    pool = torch.randn(2, kv, pool_blocks, block_size, dim, generator=gen).to(dtype)
    tables = torch.randperm(pool_blocks, generator=gen)[: batch * per_seq].view(batch, per_seq)
    q = torch.randn(batch, kv, group, dim, generator=gen).to(dtype)
    return q, pool, tables, torch.tensor(lengths)


def _sdpa(q, pool, tables, lengths):
    k = pool[0][:, tables].flatten(2, 3).transpose(0, 1).float()  # [B, KV, ctx, D]
    v = pool[1][:, tables].flatten(2, 3).transpose(0, 1).float()
    mask = torch.arange(k.shape[2])[None, :] < lengths[:, None]
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask[:, None, None, :])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_it_agrees_with_sdpa_at_every_length(built, dtype, tolerance):
    """Lengths of one token, at a block's end, one past it, and over many blocks, in one batch:
    each sequence reads its own blocks to its own length."""
    lengths = [1, 4, 5, 23, 16, 9]
    q, pool, tables, lens = _case(len(lengths), lengths, dtype)
    out = cpp_kernels.paged_decode_attention(q, pool, tables, lens)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - _sdpa(q, pool, tables, lens)).abs().max().item() < tolerance


def test_a_block_past_a_sequence_length_is_never_read(built):
    """Filling the blocks past each length with NaN changes nothing."""
    q, pool, tables, lens = _case(3, [6, 2, 9], torch.float32)
    want = cpp_kernels.paged_decode_attention(q, pool, tables, lens)
    for row, n in enumerate(lens.tolist()):
        for b, block in enumerate(tables[row].tolist()):
            tail = max(0, n - b * 4)
            pool[:, :, block, tail:] = float("nan")
    assert torch.equal(cpp_kernels.paged_decode_attention(q, pool, tables, lens), want)


def test_bad_input_is_an_error_not_a_crash(built):
    q, pool, tables, lens = _case(2, [5, 7], torch.float32)
    with pytest.raises(RuntimeError, match="lengths must fit the block tables"):
        cpp_kernels.paged_decode_attention(q, pool, tables, torch.tensor([5, 100]))
    with pytest.raises(RuntimeError, match="lengths must fit the block tables"):
        cpp_kernels.paged_decode_attention(q, pool, tables, torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match="block tables must index the pool"):
        cpp_kernels.paged_decode_attention(q, pool, tables + pool.shape[2], lens)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpp_kernels.paged_decode_attention(q.bfloat16(), pool, tables, lens)
    with pytest.raises(RuntimeError, match="int64"):
        cpp_kernels.paged_decode_attention(q, pool, tables.int(), lens)


def test_a_stale_lock_left_by_a_killed_build_does_not_hang_the_next_start(built):
    lock = cpp_kernels.build_dir() / "lock"
    lock.touch()
    old = time.time() - cpp_kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    result = []
    loader = threading.Thread(target=lambda: result.append(cpp_kernels.load.__wrapped__()), daemon=True)
    loader.start()
    loader.join(timeout=300)
    assert result == [True]
    assert not lock.exists()


def test_without_a_compiler_it_says_so_and_returns_false(built, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert cpp_kernels.load.__wrapped__() is False
    assert "the C++ kernels cannot be built here" in caplog.text


def test_it_writes_the_new_keys_and_values_before_reading_them(built):
    """With ``new_kv`` each sequence's key and value land in the slot of its last position, and
    the attention reads them: the same as writing them first, then attending."""
    lengths = [1, 4, 5, 23]
    q, pool, tables, lens = _case(len(lengths), lengths, torch.float32)
    new_kv = torch.randn(2, len(lengths), pool.shape[1], pool.shape[-1])
    written = pool.clone()
    for row, n in enumerate(lengths):
        block, offset = tables[row, (n - 1) // 4], (n - 1) % 4
        written[:, :, block, offset] = new_kv[:, row]
    out = cpp_kernels.paged_decode_attention(q, pool, tables, lens, new_kv)
    assert torch.equal(pool, written)
    assert (out - _sdpa(q, written, tables, lens)).abs().max().item() < 1e-5
    with pytest.raises(RuntimeError, match="new_kv must be"):
        cpp_kernels.paged_decode_attention(q, pool, tables, lens, new_kv[:, :2])


def _rms_reference(x, weight, eps):
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_add_rms_norm_rounds_as_torch_does(built):
    """bf16: the sum is torch's bit for bit; the norm differs from torch's chain of ops by at most
    one bf16 step in a few elements (its sum of squares is added in another order)."""
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(37, 96, generator=gen).bfloat16() for _ in range(2))
    weight = torch.randn(96, generator=gen).bfloat16()
    total, norm = cpp_kernels.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(total, x + residual)
    want = _rms_reference(x + residual, weight, 1e-5)
    assert (norm != want).float().mean().item() < 0.01
    assert ((norm.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()
    same, alone = cpp_kernels.add_rms_norm(x, None, weight, 1e-5)
    assert same is x or torch.equal(same, x)
    assert ((alone.float() - _rms_reference(x, weight, 1e-5).float()).abs() <= 0.02 * x.float().abs().max()).all()
    x32, w32 = torch.randn(5, 64, generator=gen), torch.randn(64, generator=gen)
    assert torch.allclose(cpp_kernels.add_rms_norm(x32, None, w32, 1e-6)[1], _rms_reference(x32, w32, 1e-6), atol=1e-5)


def test_silu_and_mul_matches_torch(built):
    gen = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(19, 2 * 80, generator=gen) * 6).bfloat16()  # large gates of both signs
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(cpp_kernels.silu_and_mul(gate_up), F.silu(gate) * up)
    gate_up32 = torch.randn(4, 2 * 32, generator=gen) * 30
    assert torch.allclose(cpp_kernels.silu_and_mul(gate_up32), F.silu(gate_up32[:, :32]) * gate_up32[:, 32:],
                          rtol=1e-5, atol=1e-5)


def test_rope_rotates_queries_and_keys_in_place_as_torch_does(built):
    from rankserve.model.llama import _rope

    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, rows = 4, 2, 16, 7
    angles = torch.rand(rows, dim // 2, generator=gen) * 50
    rotation = torch.polar(torch.ones_like(angles), angles)  # [T, D/2] unit complex
    for dtype in (torch.bfloat16, torch.float32):
        qkv = (torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen) * 3).to(dtype)
        want_q = _rope(qkv[:, : heads * dim].view(rows, heads, dim), rotation[:, None])
        want_k = _rope(qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim), rotation[:, None])
        values = qkv[:, (heads + kv_heads) * dim :].clone()
        out = cpp_kernels.rope_(qkv, torch.view_as_real(rotation), heads + kv_heads)
        assert out.data_ptr() == qkv.data_ptr()  # in place
        got_q = qkv[:, : heads * dim].view(rows, heads, dim)
        got_k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim)
        if dtype == torch.bfloat16:  # one rounding from float, as torch's: equal or one bf16 step apart
            for got, want in ((got_q, want_q), (got_k, want_k)):
                assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2 ** -7
                assert (got == want).float().mean() > 0.99
        else:
            assert torch.allclose(got_q, want_q, atol=1e-5) and torch.allclose(got_k, want_k, atol=1e-5)
        assert torch.equal(qkv[:, (heads + kv_heads) * dim :], values)  # the values' heads untouched
    with pytest.raises(RuntimeError, match="rotation must be"):
        cpp_kernels.rope_(torch.randn(3, 32), torch.randn(2, 8, 2), 2)
    with pytest.raises(RuntimeError, match="exceeds the row"):
        cpp_kernels.rope_(torch.randn(3, 32), torch.randn(3, 8, 2), 3)


def test_bad_shapes_are_errors(built):
    with pytest.raises(RuntimeError, match="weight \\[hidden\\]"):
        cpp_kernels.add_rms_norm(torch.randn(3, 8), None, torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="residual must be shaped"):
        cpp_kernels.add_rms_norm(torch.randn(3, 8), torch.randn(2, 8), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="gate_up must be"):
        cpp_kernels.silu_and_mul(torch.randn(3, 7))
