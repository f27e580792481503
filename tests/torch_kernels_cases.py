"""The Triton kernels of the decoder step (blenderbot_mb.torch.kernels), run by Triton's interpreter on the CPU:
each kernel against PyTorch's own operations, and generate(kernels=True) against the eager step (the same
tokens, the same scores in float32). Run by test_torch_kernels.py in a process of its own, with
TRITON_INTERPRET=1 (Triton reads it when first imported; a process that imported TensorFlow first cannot load
Triton at all). On a GPU machine test_torch_cuda.py runs the compiled kernels.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (test_torch_kernels.py does)", allow_module_level=True)
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from helpers import make_config, random_weights  # noqa: E402
from test_torch_generation import CASES, make_pair  # noqa: E402

from blenderbot_mb.errors import ConfigError  # noqa: E402
from blenderbot_mb.torch import BlenderbotForConditionalGeneration  # noqa: E402
from blenderbot_mb.torch import kernels as K  # noqa: E402


def norm(k):
    ln = torch.nn.LayerNorm(k, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    return ln


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n,k", [(37, 50), (64, 16)])
@pytest.mark.parametrize("parts", ["plain", "norm-gelu-residual", "norm-relu"])
def test_linear_equals_torch(rows, n, k, parts):
    g = torch.Generator().manual_seed(rows * 100 + n)
    x, w, b, r = (torch.randn(*s, generator=g) for s in ((rows, k), (n, k), (n,), (rows, n)))
    ln = norm(k) if parts != "plain" else None
    act = {"plain": None, "norm-gelu-residual": "gelu", "norm-relu": "relu"}[parts]
    res = r if "residual" in parts else None
    want = F.linear(ln(x) if ln is not None else x, w, b)
    want = {None: want, "gelu": F.gelu(want), "relu": F.relu(want)}[act] + (r if res is not None else 0)
    cfg = K.LinearConfig(block_n=16, block_k=16)  # several blocks each way
    got = K.linear(x, w, b, norm=ln, activation=act, residual=res, config=cfg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if rows > 1:  # the several-row kernel: several blocks of outputs and of K, K split where there is no norm
        cfg = K.RowsConfig(block_n=16, block_k=16, chunks=2)
        got = K.linear(x, w, b, norm=ln, activation=act, residual=res, config=cfg)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,chunks", [(40, 3), (80, 7), (1280, 80)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_several_row_product_in_pieces_of_k(k, chunks, with_norm):
    """A program's K in power-of-two pieces (48 = 32 + 16 with the last 8 columns masked; 112 = 64 + 32 + 16;
    1280 = 1024 + 256): the product, and the norm's statistics over every piece, as PyTorch's."""
    g = torch.Generator().manual_seed(k)
    x, w, b = (torch.randn(*s, generator=g) for s in ((5, k), (24, k), (24,)))
    w = w * k ** -0.5  # outputs of order 1 at every K: float32's sums in another order within the tolerance
    ln = norm(k) if with_norm else None
    want = F.linear(ln(x) if ln is not None else x, w, b)
    got = K.linear(x, w, b, norm=ln, config=K.RowsConfig(block_n=16, block_k=16, chunks=chunks, block_m=8))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rows_pieces_are_powers_of_two_that_add_up():
    for part in (16, 48, 112, 1280, 5120, 1280 + 16):
        pieces = K.rows_pieces(part)
        assert sum(pieces) == part
        assert all(p & (p - 1) == 0 for p in pieces)
        assert list(pieces) == sorted(set(pieces), reverse=True)
    assert K.rows_pieces(1280) == (1024, 256)


def test_linear_makes_its_row_from_the_embedding_tables(dtype=torch.float32):
    """embed=: the first product's row is table[token] * scale + positions[index], written into x for the
    residual. (bfloat16 runs in test_torch_cuda.py: the interpreter truncates float32 -> bfloat16.)"""
    rows, k, n, vocab = 3, 40, 24, 11
    g = torch.Generator().manual_seed(5)
    table, positions = torch.randn(vocab, k, generator=g).to(dtype), torch.randn(7, k, generator=g).to(dtype)
    w, b = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    ln = norm(k).to(dtype)
    tokens = torch.tensor([[4, 1], [0, 1], [10, 1]])[:, 0]  # strided, as a column of the sequences is
    index, scale = torch.tensor([5]), 6.324555320336759
    want_h = F.embedding(tokens, table) * scale + F.embedding(index, positions)
    want = F.linear(ln(want_h), w, b)
    for config in (K.LinearConfig(block_n=8, block_k=16), K.RowsConfig(block_n=16, block_k=16)):  # one row's
        h = torch.full((rows, k), float("nan"), dtype=dtype)  # kernel, the several-row kernel
        got = K.linear(h, w, b, norm=ln, embed=K.Embedded(tokens, table, scale, positions, index), config=config)
        torch.testing.assert_close(h, want_h, rtol=0, atol=0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="norm"):
        K.linear(h, w, b, embed=K.Embedded(tokens, table, scale, positions, index))


def test_linear_without_bias_into_float32():
    x, w = torch.randn(2, 24, dtype=torch.float64).float(), torch.randn(10, 24)
    got = K.linear(x, w, None, out_dtype=torch.float32)
    torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-5)


def test_linear_writes_into_the_rows_it_is_given():
    """out=: the result into rows of a wider tensor (kernel_logits' groups write their rows of one logits
    tensor), the columns beside them untouched; a tensor of another shape or dtype is refused."""
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(3, 24, generator=g), torch.randn(10, 24, generator=g)
    wide = torch.zeros(5, 12)
    got = K.linear(x, w, None, out=wide[1:4, :10])
    torch.testing.assert_close(wide[1:4, :10], x @ w.T, rtol=1e-5, atol=1e-5)
    assert got.data_ptr() == wide[1:4].data_ptr() and not wide[0].any() and not wide[4].any() and not wide[:, 10:].any()
    with pytest.raises(ValueError, match=r"takes a \[3, 10\] torch.float32"):
        K.linear(x, w, None, out=torch.zeros(3, 11))
    with pytest.raises(ValueError, match="got"):
        K.linear(x, w, None, out=torch.zeros(3, 10, dtype=torch.float64))


def test_self_attention_writes_the_new_key_and_value_and_attends_up_to_the_index():
    rows, heads, length, hd = 3, 2, 9, 5  # head_dim 5: padded to 8 inside the kernel
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(rows, 3 * heads * hd, generator=g)
    k, v = torch.randn(rows, heads, length, hd, generator=g), torch.randn(rows, heads, length, hd, generator=g)
    want_k, want_v, d = k.clone(), v.clone(), heads * hd
    index = 4
    want_k[:, :, index] = qkv[:, d:2 * d].view(rows, heads, hd)
    want_v[:, :, index] = qkv[:, 2 * d:].view(rows, heads, hd)
    got = K.attention(qkv, k, v, heads=heads, index=torch.tensor([index]), new=qkv[:, d:], block_l=2)
    q = qkv[:, :d].view(rows, heads, 1, hd)
    want = F.scaled_dot_product_attention(q, want_k[:, :, :index + 1], want_v[:, :, :index + 1])
    torch.testing.assert_close(got, want.reshape(rows, d), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, want_k, rtol=0, atol=0)  # the new key written, the rest untouched
    torch.testing.assert_close(v, want_v, rtol=0, atol=0)


def test_self_attention_reads_each_position_from_the_cache_row_its_table_names():
    """Beam search's table: position p of row r is read from cache row table[r, p]; the new key and value go
    into the row's own cache row (or nowhere: write=False)."""
    rows, heads, length, hd = 3, 2, 9, 5
    g = torch.Generator().manual_seed(3)
    d = heads * hd
    qkv = torch.randn(rows, 3 * d, generator=g)
    k, v = torch.randn(rows, heads, length, hd, generator=g), torch.randn(rows, heads, length, hd, generator=g)
    table = torch.tensor([[0, 2, 1, 1, 0, 2, 2, 0, 1], [1, 1, 1, 0, 2, 0, 0, 2, 2], [2, 0, 0, 2, 1, 1, 1, 1, 0]],
                         dtype=torch.int32)
    index = 6
    table[:, index] = torch.arange(rows, dtype=torch.int32)  # the caller's: each row's new position is its own
    want_table = table.clone()
    want_k, want_v = k.clone(), v.clone()
    want_k[:, :, index] = qkv[:, d:2 * d].view(rows, heads, hd)
    want_v[:, :, index] = qkv[:, 2 * d:].view(rows, heads, hd)
    gathered_k = torch.stack([torch.stack([want_k[int(want_table[r, p]), :, p] for p in range(index + 1)], 1)
                              for r in range(rows)])  # [rows, heads, index + 1, hd]
    gathered_v = torch.stack([torch.stack([want_v[int(want_table[r, p]), :, p] for p in range(index + 1)], 1)
                              for r in range(rows)])
    got = K.attention(qkv, k, v, heads=heads, index=torch.tensor([index]), new=qkv[:, d:], table=table, block_l=4)
    want = F.scaled_dot_product_attention(qkv[:, :d].view(rows, heads, 1, hd), gathered_k, gathered_v)
    torch.testing.assert_close(got, want.reshape(rows, d), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, want_k, rtol=0, atol=0)
    torch.testing.assert_close(v, want_v, rtol=0, atol=0)
    assert torch.equal(table, want_table)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, index], v2[:, :, index] = 0.0, 0.0
    again = K.attention(qkv, k2, v2, heads=heads, index=torch.tensor([index]), new=qkv[:, d:], table=table,
                        write=False, block_l=4)
    torch.testing.assert_close(again, got, rtol=0, atol=0)  # the new key and value from `new`, not the cache
    assert torch.equal(k2[:, :, index], torch.zeros_like(k2[:, :, index]))  # and not written
    unset = table.clone()
    unset[:, index] = torch.tensor([2, 2, 0], dtype=torch.int32)  # stale entries at the index (other rows)
    third = K.attention(qkv, k2, v2, heads=heads, index=torch.tensor([index]), new=qkv[:, d:], table=unset,
                        write=False, set_table=True, block_l=4)
    torch.testing.assert_close(third, got, rtol=0, atol=0)  # the entry at the index is never read
    assert torch.equal(unset, want_table)  # set_table: the kernel sets each row's entry at the index


def test_self_attention_of_a_group_of_rows_reads_and_writes_the_whole_cache():
    """`row0`: rows 2..4 of a 5-row step (a group of them) read positions from any cache row the table names,
    write the new key and value into their own rows 2..4 and set their table entries to those rows, as the
    whole step does for them; the other rows' cache stays as it was."""
    rows, heads, length, hd = 5, 2, 7, 5
    g = torch.Generator().manual_seed(4)
    d = heads * hd
    qkv = torch.randn(rows, 3 * d, generator=g)
    k, v = torch.randn(rows, heads, length, hd, generator=g), torch.randn(rows, heads, length, hd, generator=g)
    table = torch.randint(0, rows, (rows, length), generator=g, dtype=torch.int32)
    index = torch.tensor([4])
    whole_k, whole_v, whole_table = k.clone(), v.clone(), table.clone()
    want = K.attention(qkv, whole_k, whole_v, heads=heads, index=index, new=qkv[:, d:], table=whole_table,
                       set_table=True, block_l=4)
    group = slice(2, 5)
    got = K.attention(qkv[group], k, v, heads=heads, index=index, new=qkv[group, d:], table=table[group],
                      set_table=True, block_l=4, row0=2)
    torch.testing.assert_close(got, want[group], rtol=0, atol=0)
    torch.testing.assert_close(k[group], whole_k[group], rtol=0, atol=0)
    torch.testing.assert_close(v[group], whole_v[group], rtol=0, atol=0)
    assert torch.equal(table[group], whole_table[group]) and table[2:, 4].tolist() == [2, 3, 4]
    assert not torch.equal(k[:2], whole_k[:2])  # rows 0 and 1: not this group's to write
    with pytest.raises(ValueError, match="rows 3..5 of k/v's 5"):
        K.attention(qkv[group], k, v, heads=heads, index=index, new=qkv[group, d:], row0=3)


def test_a_step_of_many_rows_in_groups_equals_the_step_in_one(pairs, monkeypatch):
    """kernel_logits over 8 rows in groups of 3 (3 + 3 + 2; on GPUs each group on a stream of its own, here in
    turn), with a beam table naming cache rows of other groups: the logits and the cache the whole step gives
    (up to the order of float32 sums: the interpreter's products are NumPy's, whose sums for a row depend on
    its place in the block), and the counters of each group's products with K split (`slot`) left at zero."""
    from blenderbot_mb.torch.decoding import fused_weights
    from blenderbot_mb.torch.generation import beam_table
    from blenderbot_mb.torch.modeling import KVCache

    ours, _, _ = pair_of(pairs, "tiny")
    config = ours.config
    layers, heads = config.decoder_layers, config.decoder_attention_heads
    rows, length, hd = 8, 6, config.d_model // heads
    g = torch.Generator().manual_seed(5)
    buffers = torch.randn(layers, 2, rows, heads, length, hd, generator=g)
    cross = [(torch.randn(rows, heads, 4, hd, generator=g), torch.randn(rows, heads, 4, hd, generator=g))
             for _ in range(layers)]
    mask = torch.tensor([[1, 1, 1, 0]] * rows)
    tokens = torch.randint(4, config.vocab_size, (rows,), generator=g)
    table = beam_table(rows, length, "cpu")
    table[:, :3] = torch.randint(0, rows, (rows, 3), generator=g, dtype=torch.int32)  # the beams' earlier rows
    monkeypatch.setattr(K, "ROWS_OVERRIDES", {(config.d_model, config.decoder_ffn_dim): K.RowsConfig(
        block_n=16, block_k=16, chunks=1)})  # fc2's K (32) in two parts: counters per group
    results = []
    for groups in (False, True):
        monkeypatch.setattr(K, "GROUPS", groups)
        monkeypatch.setattr(K, "GROUP_ROWS", 3)
        cache = KVCache(layers, cross_kv=cross, buffers=buffers.clone(), index=torch.tensor([3]), table=table.clone())
        with torch.no_grad():
            logits = K.kernel_logits(ours, tokens, cache, mask, fused_weights(ours))
        results.append((logits, cache.buffers, cache.table))
    (want, want_buffers, want_table), (got, got_buffers, got_table) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_buffers, want_buffers, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got_buffers, buffers)  # (the new keys and values written at the index)
    assert torch.equal(got_table, want_table) and got_table[:, 3].tolist() == list(range(rows))
    fc2 = fused_weights(ours)[0][0]["fc2"][0]
    slots = [key[2] for key, counts in K._COUNTS.items() if key[1] == fc2.data_ptr() and not counts.any()]
    assert sorted(slots) == [0, 1, 2]


@pytest.mark.parametrize("hd", [5, 8, 40])
def test_positions_read_ahead_weigh_nothing_even_if_not_finite(hd):
    """The first block of positions is read before the step index and the mask are known: positions past the
    index (self-attention) or masked (cross-attention) holding NaN or inf change nothing. Head sizes whose
    offsets allow vectorized reads (8, 40: multiples of 8) and one that doesn't (5)."""
    rows, heads, length = 2, 3, 16
    g = torch.Generator().manual_seed(4)
    d = heads * hd
    qkv = torch.randn(rows, 3 * d, generator=g)
    k, v = torch.randn(rows, heads, length, hd, generator=g), torch.randn(rows, heads, length, hd, generator=g)
    index = 5
    k[:, :, index + 1:], v[:, :, index + 1:] = float("nan"), float("inf")
    want_k, want_v = k[:, :, :index + 1].clone(), v[:, :, :index + 1].clone()
    want_k[:, :, index] = qkv[:, d:2 * d].view(rows, heads, hd)
    want_v[:, :, index] = qkv[:, 2 * d:].view(rows, heads, hd)
    q = qkv[:, :d].view(rows, heads, 1, hd)
    want = F.scaled_dot_product_attention(q, want_k, want_v).reshape(rows, d)
    for block_l in (None, 4):
        got = K.attention(qkv, k, v, heads=heads, index=torch.tensor([index]), new=qkv[:, d:], block_l=block_l)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    mask = torch.tensor([[1] * 7 + [0] * 9, [0, 1, 1] + [0] * 13])
    k, v = torch.randn(rows, heads, length, hd, generator=g), torch.randn(rows, heads, length, hd, generator=g)
    k[mask[:, None, :].expand(-1, heads, -1) == 0] = float("nan")
    v[mask[:, None, :].expand(-1, heads, -1) == 0] = float("-inf")
    kept = [mask[r].nonzero()[:, 0] for r in range(rows)]
    want = torch.cat([F.scaled_dot_product_attention(q[r:r + 1], k[r:r + 1, :, kept[r]], v[r:r + 1, :, kept[r]])
                      .reshape(1, d) for r in range(rows)])
    torch.testing.assert_close(K.attention(qkv, k, v, heads=heads, mask=mask), want, rtol=1e-5, atol=1e-6)


def test_attention_refuses_keys_whose_head_values_are_not_contiguous():
    q = torch.randn(2, 3 * 8)
    k = torch.randn(2, 2, 5, 4).transpose(2, 3)  # [rows, heads, 4 positions, 5 values] with stride 4 between them
    with pytest.raises(ValueError, match="contiguous"):
        K.attention(q, k, k, heads=2)


def test_attention_alignment_follows_the_strides():
    x = torch.zeros(2, 3, 16, 40)
    assert K._alignment(x, x) == 8  # 40-value positions: 16-byte vectors in bf16
    assert K._alignment(torch.zeros(2, 3, 16, 5), x) == 1  # positions 5 values apart
    assert K._alignment(x[:, :, :, :20], x) == 8  # a view: the strides count, not the shape
    y = torch.zeros(2, 3, 16, 6)
    assert K._alignment(y, y) == 2


def test_cross_attention_gives_masked_keys_no_weight():
    rows, heads, length, hd = 3, 2, 9, 6
    g = torch.Generator().manual_seed(2)
    q = torch.randn(rows, heads * hd, generator=g)
    k, v = torch.randn(rows, heads, length, hd, generator=g), torch.randn(rows, heads, length, hd, generator=g)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [0, 1, 1, 0, 1, 1, 1, 1, 0]])
    got = K.attention(q, k, v, heads=heads, mask=mask, block_l=4)
    bias = torch.zeros(rows, length).masked_fill(mask == 0, float("-inf"))[:, None, None]
    want = F.scaled_dot_product_attention(q.view(rows, heads, 1, hd), k, v, attn_mask=bias).reshape(rows, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    v[1, :, 5:] = 1e6  # masked values change nothing
    torch.testing.assert_close(K.attention(q, k, v, heads=heads, mask=mask, block_l=4), got, rtol=0, atol=0)


@pytest.fixture(scope="module")
def pairs():
    return {}


def pair_of(pairs, name):
    """make_pair's; "tiny" with 2 decoder heads instead of 4: the interpreter runs each program of a kernel in
    Python, and an attention kernel has one program per row and head (beam search's 20 rows, 9 steps)."""
    if name not in pairs:
        ours, _, ids, mask = make_pair(name, **({"decoder_attention_heads": 2} if name == "tiny" else {}))
        pairs[name] = ours, ids, mask
    return pairs[name]


def scored(model, ids, mask, **settings):
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **settings)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("name,case,row", [("tiny", "greedy_encoder_ngram", 0), ("tiny", "greedy_min_length", 3),
                                           ("odd", "greedy_repetition_bad_words", 1)])
def test_kernel_step_gives_the_eager_tokens_and_scores(pairs, name, case, row):
    """One row (a padded one too: row 3 of the batch): the kernels' step."""
    ours, ids, mask = pair_of(pairs, name)
    ids, mask = ids[row:row + 1], mask[row:row + 1]
    settings = dict(CASES[case], max_length=10)  # (9 steps: each a few seconds in the interpreter)
    want, want_scores = scored(ours, ids, mask, **settings)
    got, got_scores = scored(ours, ids, mask, kernels=True, **settings)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,loop,rows_kernel", [
    ("beam_published_style", False, True), ("beam_return_3_early", True, True), ("greedy_min_length", False, True),
    ("beam_return_3_early", True, False), ("greedy_min_length", False, False)])  # (the compiled step's beam search
def test_several_rows_steps(pairs, monkeypatch, case, loop, rows_kernel):  # with n-gram blocking: on the GPU)
    """Beam search and batches with kernels=True: the kernels' step with the several-row product kernel
    (kernels.ROWS, the default), or the fused step (compiled on GPUs) around the attention kernel. Either way
    the attention kernel reads the beams' keys through a table that beam search reorders: the eager step's
    tokens and scores."""
    from blenderbot_mb.torch import decoding

    ours, ids, mask = pair_of(pairs, "tiny")
    monkeypatch.setattr(K, "ROWS", rows_kernel)
    monkeypatch.setattr(K, "ROWS_M", 32)  # every case's rows (up to 20: two blocks of rows) by the kernel
    products = []  # the rows counts of the kernels' products
    monkeypatch.setattr(K, "linear", lambda x, *a, _linear=K.linear, **kw: products.append(x.shape[0])
                        or _linear(x, *a, **kw))
    if not rows_kernel:
        monkeypatch.setattr(K, "kernel_logits", None)  # would fail if called
    calls = []
    monkeypatch.setattr(K, "attention", lambda *a, _attention=K.attention, **kw: calls.append(kw.get("table"))
                        or _attention(*a, **kw))
    long_top_k = []  # beam search's top-k over beams x vocabulary: by kernels.top_k (rows this short allowed here)
    monkeypatch.setattr(K, "TOP_K_SHORTEST", 2 * ours.config.vocab_size)
    monkeypatch.setattr(K, "top_k", lambda x, k, _top_k=K.top_k: long_top_k.append(x.shape) or _top_k(x, k))
    ours.__dict__.pop("_decode_functions", None)
    settings = SHORT.get(case, CASES[case])  # (the interpreter runs each step's programs one by one)
    if loop:  # the search's loop with no host read (per-step scores would need the host): the same ids
        want = ours.generate(ids, attention_mask=mask, **settings)
        assert torch.equal(ours.generate(ids, attention_mask=mask, kernels=True, device_loop=True, **settings), want)
    else:
        want, want_scores = scored(ours, ids, mask, **settings)
        got, got_scores = scored(ours, ids, mask, kernels=True, **settings)
        assert torch.equal(got, want)
        torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)
    assert calls and any(t is not None for t in calls)  # the self-attention read through the table
    assert bool(long_top_k) == ("beam" in case)
    assert (bool(products) and min(products) > 1) == rows_kernel  # several rows' products in the kernel
    options = decoding.DecodingOptions(fused=True, kernels=True).for_rows(ours, 10)
    assert options.attention_kernel and options.fused and options.kernels == rows_kernel and not options.compile
    options = decoding.DecodingOptions(fused=True, kernels=True).for_rows(ours, K.ROWS_M + 1)  # more rows: compiled
    assert options.attention_kernel and options.fused and not options.kernels and not options.compile  # (on GPUs)


def test_the_several_row_product_adds_its_parts_of_k_in_order():
    """A K longer than one program's blocks is split over programs; the last part to finish adds the parts in
    order (the same sums every run) and writes the epilogue; the counters are left at zero for the next call."""
    g = torch.Generator().manual_seed(3)
    rows, n, k = 5, 40, 160
    x, w, b, r = (torch.randn(*s, generator=g) for s in ((rows, k), (n, k), (n,), (rows, n)))
    cfg = K.RowsConfig(block_n=16, block_k=32, chunks=2)  # 5 blocks of K: 3 parts, the last one half masked
    got = K.linear(x, w, b, residual=r, activation="gelu", config=cfg)
    torch.testing.assert_close(got, F.gelu(F.linear(x, w, b)) + r, rtol=1e-5, atol=1e-5)
    assert not K._counts(w, 1).any()
    assert torch.equal(K.linear(x, w, b, residual=r, activation="gelu", config=cfg), got)
    used = K._counts(w, 1)  # settings needing more counters get a new set; the old one stays allocated (a
    wider = K.RowsConfig(block_n=16, block_k=16, chunks=2, block_m=4)  # graph captured with it would count there)
    torch.testing.assert_close(K.linear(x, w, b, residual=r, config=wider), F.linear(x, w, b) + r, rtol=1e-5,
                               atol=1e-5)
    assert K._counts(w, 1) is not used and any(t is used for t in K._RETIRED)


def test_kernel_step_with_odd_head_size_and_relu():
    config = make_config("relu", d_model=40, decoder_attention_heads=8, encoder_attention_heads=4)  # head_dim 5
    ours = BlenderbotForConditionalGeneration(config).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in random_weights(config, seed=3).items()}, strict=False)
    ids = torch.randint(4, config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    for settings in (dict(max_new_tokens=6), dict(max_new_tokens=5, do_sample=True, top_k=5, seed=3)):
        want, want_scores = scored(ours, ids, None, **settings)
        got, got_scores = scored(ours, ids, None, kernels=True, **settings)
        assert torch.equal(got, want)
        torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)


def test_kernels_are_refused_with_other_step_options_and_off_the_interpreter(pairs, monkeypatch):
    ours, ids, mask = pair_of(pairs, "tiny")
    with pytest.raises(ConfigError, match="on its own"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, kernels=True, packed=True)
    with pytest.raises(ConfigError, match="on its own"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, kernels=True, compile=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="NVIDIA GPUs"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, kernels=True)


def test_kernel_step_of_the_decoder_only_model():
    """BlenderbotForCausalLM: no cross-attention, no final_logits_bias; a prompt run through the step first."""
    from helpers import random_batch

    from blenderbot_mb.torch import BlenderbotForCausalLM

    config = make_config("odd")
    ours = BlenderbotForCausalLM(config).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in random_weights(config, "BlenderbotForCausalLM",
                                                                             seed=2).items()}, strict=False)
    prompt = torch.from_numpy(random_batch(config, batch=1, src_len=5, pad=False)["input_ids"])
    want, want_scores = scored(ours, prompt, None, max_new_tokens=6, no_repeat_ngram_size=2)
    got, got_scores = scored(ours, prompt, None, max_new_tokens=6, no_repeat_ngram_size=2, kernels=True)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)


# the simulated captures' tests below run every step's kernels in the interpreter several times over: their
# replies are shorter than the shared cases' (past the minimum length, n-gram blocking and the beams' finishing
# still act)
SHORT = {"greedy_min_length": dict(CASES["greedy_min_length"], max_length=11),
         "greedy_ngram": dict(CASES["greedy_ngram"], max_length=12),
         "beam_published_style": dict(CASES["beam_published_style"], max_length=11)}


def test_kernel_step_on_generates_cuda_path_with_the_captures_simulated(pairs, monkeypatch):
    """generate()'s CUDA path with kernels=True, the captures simulated on the CPU (as test_torch_device_loop
    does): the step's buffers, the prefill into them, the step captured alone or inside the search's loop body,
    inputs of two lengths in one bucket one after the other: the eager loop's tokens each time."""

    from test_torch_device_loop import simulate_captures

    simulate_captures(monkeypatch)
    ours, ids, mask = pair_of(pairs, "tiny")
    ours.__dict__.pop("_cuda_graph_steps", None)
    try:
        for loop in (True, False):  # the search's loop body captured, or the step alone
            for x, m in ((ids[3:4], mask[3:4]), (ids[1:2, :6], mask[1:2, :6])):
                want = ours.generate(x, attention_mask=m, cuda_graph=False, **SHORT["greedy_min_length"])
                got = ours.generate(x, attention_mask=m, kernels=True, device_loop=loop, **SHORT["greedy_min_length"])
                assert torch.equal(got, want)
        assert len(ours._cuda_graph_steps) == 2  # one step's buffers each, prefilled twice
        writes = []  # beam search's loop body (its default): the new state into the buffers by one kernel
        monkeypatch.setattr(K, "write_state", lambda *a, _write=K.write_state: writes.append(1) or _write(*a))
        for x, m in ((ids[3:4], mask[3:4]), (ids[1:2, :6], mask[1:2, :6])):
            settings = dict(attention_mask=m, return_dict_in_generate=True, **SHORT["beam_published_style"])
            want = ours.generate(x, cuda_graph=False, **settings)  # (per-step scores would need the host)
            got = ours.generate(x, kernels=True, **settings)
            assert torch.equal(got.sequences, want.sequences)
            torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)
        assert writes
    finally:
        ours.__dict__.pop("_cuda_graph_steps", None)


def test_compiled_search_runs_the_step_as_one_operator(pairs, monkeypatch):
    """The captured loop's search compiled by inductor (as on GPUs) around the kernels' step, simulated on the
    CPU: the step one operator of the search's graph (generation._loop_step), beam search's reorder of the beam
    table another (kernels.reorder_rows), and the step's own write of each row's table entry ordered before
    that reorder: the eager loop's tokens and scores, for batches (a table, no reorder) and beam search."""

    from test_torch_device_loop import CompiledLoop, simulate_captures

    from blenderbot_mb.torch import generation

    simulate_captures(monkeypatch, CompiledLoop)
    monkeypatch.setattr(generation, "_compiled_search", lambda options, device: True)
    reorders = []
    monkeypatch.setattr(K, "reorder_rows", lambda *a, _reorder=K.reorder_rows: reorders.append(1) or _reorder(*a))
    ours, ids, mask = pair_of(pairs, "tiny")
    ours.__dict__.pop("_cuda_graph_steps", None)
    try:
        for x, m, case in ((ids[:2], mask[:2], "greedy_ngram"), (ids[1:2, :6], mask[1:2, :6], "beam_published_style")):
            settings = dict(attention_mask=m, return_dict_in_generate=True, **SHORT[case])
            want = ours.generate(x, cuda_graph=False, **settings)
            got = ours.generate(x, kernels=True, device_loop=True, **settings)
            assert torch.equal(got.sequences, want.sequences), case
            if want.sequences_scores is not None:
                torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)
            assert all(step.cache.table is not None for step in ours._cuda_graph_steps.values())
            assert bool(reorders) == (case.startswith("beam")), case
    finally:
        ours.__dict__.pop("_cuda_graph_steps", None)


@pytest.mark.parametrize("rows,length", [(10, 100), (3, 7), (64, 300), (130, 40), (1, 5)])
def test_reorder_rows_equals_a_gather(rows, length):
    g = torch.Generator().manual_seed(rows)
    table = torch.randint(0, 2**30, (rows, length), dtype=torch.int32, generator=g)
    for order in (torch.randperm(rows, generator=g), torch.randint(0, rows, (rows,), generator=g)):
        want = table.numpy()[order.numpy()]
        K.reorder_rows(table, order)
        np.testing.assert_array_equal(table.numpy(), want)
    for table, order in ((torch.zeros(4, 6).t(), torch.zeros(6, dtype=torch.long)),
                         (torch.zeros(4, 6), torch.zeros(3, dtype=torch.long)), (torch.zeros(4, 6), torch.zeros(4))):
        with pytest.raises(ValueError, match="reorder_rows takes"):
            K.reorder_rows(table, order)


def _numpy_top_k(x, k):
    """The k largest of each row, largest first, ties in the lower index first; NaN above everything."""
    x = x.astype(np.float64)
    key = np.where(np.isnan(x), np.inf, np.where(x == np.inf, 1e300, x))
    order = np.argsort(-key, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(x, order, axis=-1), order


@pytest.mark.parametrize("n,k,part", [(1500, 20, None), (1500, 20, 128), (300, 7, 64), (40, 40, 16), (1030, 1, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_equals_a_stable_sort(n, k, part, dtype):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randint(-6, 6, (3, n), generator=g).to(dtype) / 4  # many ties
    x[0, ::7] = float("-inf")  # blocked tokens
    x[1, : n // 2] = float("-inf")
    x[1, 5] = -0.0
    x[2, 3] = float("nan")
    x[2, 1] = float("inf")
    x[2, -1] = float("nan") if n > 50 else 0.0
    values, index = K.top_k(x, k, part=part)
    want_values, want_index = _numpy_top_k(x.float().numpy(), k)
    assert index.dtype == torch.int64 and values.dtype == dtype
    np.testing.assert_array_equal(index.numpy(), want_index)
    np.testing.assert_array_equal(values.float().numpy(), want_values)


def test_top_k_refuses_what_it_does_not_take():
    for x, k in ((torch.zeros(2, 10, dtype=torch.long), 2), (torch.zeros(2, 10), 11), (torch.zeros(2, 10), 65),
                 (torch.zeros(10, 2).t(), 2), (torch.zeros(1, 200 * K.TOP_K_PART), 64)):
        with pytest.raises(ValueError, match="top_k takes"):
            K.top_k(x, k)
    assert K.top_k_fits(torch.zeros(1, 80080), 20) and not K.top_k_fits(torch.zeros(1, 1000), 20)
    assert not K.top_k_fits(torch.zeros(1, 200 * K.TOP_K_PART), 64)


def test_write_state_writes_every_pair_only_where_the_step_ran():
    """The end of a captured search step: each source into its buffer (mixed dtypes and sizes, more values
    than a program's block), or nothing where the step was frozen."""
    g = torch.Generator().manual_seed(5)
    sources = [torch.randint(0, 9, (2, 10, 160), generator=g), torch.randn(3, 7, generator=g),
               torch.rand(1, 10, generator=g) > 0.5, torch.tensor(True), torch.randn(1, 10, generator=g)[:, ::2]]
    for go in (False, True):
        targets = [torch.zeros_like(x).contiguous() for x in sources]
        before = [t.clone() for t in targets]
        K.write_state(torch.tensor([go]), sources, targets)
        for x, t, b in zip(sources, targets, before, strict=True):
            assert torch.equal(t, x if go else b)
    with pytest.raises(ValueError, match="shape and dtype"):
        K.write_state(torch.tensor([True]), [torch.zeros(3)], [torch.zeros(3, dtype=torch.long)])
