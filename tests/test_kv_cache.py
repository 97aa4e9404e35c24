"""The transformer's static KV cache: pre-allocated buffers written in place, logits equal to a full
causal forward at every position (left padding and packed segments invisible), the AR sampler's
tokens unchanged by it, and a clear error past its capacity. A block layout call against the cache (the hybrid's
draft block after its clean row) equals the uncached layout call over the whole span at the new positions."""

import pytest
import torch
from torch import nn

from conftest import SPECIAL, tiny_transformer
from diffuse.errors import DiffuseError
from diffuse.objectives.autoregressive import Autoregressive
from diffuse.sampling.ar import ARSampler

TOL = {"rtol": 0.0, "atol": 1e-5}
AR_OBJ = Autoregressive(special=SPECIAL)


def left_padded(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 36, (len(lengths), width), generator=g)
    seg = torch.zeros_like(x)
    for r, n in enumerate(lengths):
        seg[r, width - n:] = 1
        x[r, : width - n] = SPECIAL.pad
    return x, seg


@torch.no_grad()
def decode(model, x, seg, prefill, chunk=1, capacity=None):
    """Logits from a prefill of `prefill` positions, then `chunk` positions per cached call."""
    cache = model.new_cache(max_length=capacity or x.shape[1])
    out = [model.logits(model(ids=x[:, :prefill], segment_ids=seg[:, :prefill], causal=True, cache=cache))]
    for j in range(prefill, x.shape[1], chunk):
        out.append(model.logits(model(ids=x[:, j : j + chunk], segment_ids=seg[:, j : j + chunk], causal=True, cache=cache)))
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("chunk", [1, 3])
def test_static_cache_logits_equal_a_full_causal_forward_at_every_position(chunk):
    model = tiny_transformer(seed=1)
    width, total = 7, 16  # prompts of 7, 4 and 1 real positions, left-padded to 7; then 9 decoded
    x, seg = left_padded([7, 4, 1], width, seed=2)
    tail = torch.randint(0, 36, (3, total - width), generator=torch.Generator().manual_seed(3))
    x, seg = torch.cat([x, tail], 1), torch.cat([seg, torch.ones_like(tail)], 1)
    with torch.no_grad():
        full = model.logits(model(ids=x, segment_ids=seg, causal=True))
    cached, cache = decode(model, x, seg, width, chunk, capacity=total + 4)  # spare capacity is never read
    torch.testing.assert_close(cached, full, **TOL)  # padding positions included
    for r in range(3):  # and each row equals its unpadded self: the padding is invisible
        real = seg[r].bool()
        with torch.no_grad():
            alone = model.logits(model(ids=x[r : r + 1, real], causal=True))
        torch.testing.assert_close(cached[r, real], alone[0], **TOL)
    assert cache.length == total and cache.keys[0].shape == (3, 2, total + 4, 16)  # [B, H, capacity, head_dim]


def test_static_cache_keeps_packed_segments_apart():
    model = tiny_transformer(seed=1)
    x = torch.randint(0, 36, (1, 12), generator=torch.Generator().manual_seed(4))
    seg = torch.tensor([[1] * 5 + [2] * 7])  # a document boundary inside the prefill
    with torch.no_grad():
        full = model.logits(model(ids=x, segment_ids=seg, causal=True))
        second = model.logits(model(ids=x[:, 5:], causal=True))
    cached, _ = decode(model, x, seg, prefill=7)
    torch.testing.assert_close(cached, full, **TOL)
    torch.testing.assert_close(cached[:, 5:], second, **TOL)


def test_cache_buffers_are_allocated_once_and_written_in_place():
    model = tiny_transformer()
    x, seg = left_padded([5, 2], 5)
    cache = model.new_cache(max_length=9)

    def pointers():
        return [t.data_ptr() for t in (*cache.keys, *cache.values, cache.segment_ids)]

    with torch.no_grad():
        model(ids=x, segment_ids=seg, causal=True, cache=cache)
        ptrs = pointers()
        for _ in range(4):
            model(ids=x[:, -1:], segment_ids=torch.ones_like(x[:, -1:]), causal=True, cache=cache)
    assert pointers() == ptrs
    assert cache.length == 9 and cache.segment_ids.shape == (2, 9)


def test_decoding_past_the_capacity_is_a_one_line_error_naming_the_sizes():
    model = tiny_transformer()
    x, seg = left_padded([4, 2], 4)
    cache = model.new_cache(max_length=5)
    with torch.no_grad():
        model(ids=x, segment_ids=seg, causal=True, cache=cache)
        model(ids=x[:, :1], causal=True, cache=cache)
        with pytest.raises(DiffuseError, match=r"5 cached \+ 1 new = 6 positions > capacity 5") as err:
            model(ids=x[:, :1], causal=True, cache=cache)
    assert "\n" not in str(err.value)
    assert cache.length == 5  # the failed call wrote nothing


class NoCache(nn.Module):
    """The same backbone without `new_cache`: the AR sampler re-runs the whole prefix each step."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.time_conditioned = inner, inner.time_conditioned

    def forward(self, **kw):
        return self.inner(**kw)

    def logits(self, hidden):
        return self.inner.logits(hidden)


@pytest.mark.parametrize("sampler", [ARSampler(temperature=0.0), ARSampler(temperature=1.0),
                                     ARSampler(temperature=0.8, top_k=10, top_p=0.9)])
def test_ar_sampler_tokens_are_the_same_with_and_without_the_cache(sampler):
    model = tiny_transformer(seed=2)
    prompts = [[1, 2, 3], [], [4, 5, 6, 7, 8, 9], [10]]
    for seed in range(2):
        cached = sampler.generate(model, AR_OBJ, prompts, 16, seed=seed)
        rerun = sampler.generate(NoCache(model), AR_OBJ, prompts, 16, seed=seed)
        assert torch.equal(cached.tokens, rerun.tokens) and torch.equal(cached.lengths, rerun.lengths)
        assert cached.nfe == rerun.nfe and torch.equal(cached.row_nfe, rerun.row_nfe)
        for r, p in enumerate(prompts):  # batch = singles
            alone = sampler.generate(model, AR_OBJ, [p], 16, seed=seed)
            if sampler.temperature == 0.0:
                assert torch.equal(alone.tokens[0], cached.tokens[r])


# -- a block layout against the cache (the hybrid's draft block after its clean row) -----------------------------
def full_layout(offset, new):
    """The uncached layout of [cached positions (clean, keyed by position) ; the new span's `new` layout]."""
    from diffuse.models.layers import BlockLayout

    before = torch.arange(offset)
    return BlockLayout(torch.cat([before, new.block + offset]),
                       torch.cat([torch.ones(offset, dtype=torch.bool), new.clean]),
                       torch.cat([before, new.positions + offset]))


@pytest.mark.parametrize("offset", [3, 6])
def test_a_cached_block_layout_call_equals_the_uncached_call_on_the_same_positions(offset):
    """Prefill `offset` positions causally, then one cached call of [2 clean tokens ; 3 MASK as a draft block keyed
    after them ; a second draft block of 2 keyed after the first]: its logits equal the uncached layout call
    over the whole span at the new positions (left padding, and a document boundary inside the cache)."""
    from diffuse.models.layers import BlockLayout

    model = tiny_transformer(seed=1)
    width = 9
    x, seg = left_padded([9, 5, 2], width, seed=4)
    seg[0, :4] = 2  # row 0: two documents (segments 2 then 1) in its clean row
    seg[0, 4:] = 1
    new = BlockLayout(torch.tensor([0, 1, 2, 2, 2, 5, 5]), torch.tensor([True, True] + [False] * 5),
                      torch.tensor([0, 1, 2, 3, 4, 2, 3]))  # the second block: positions 2, 3 again
    ids = torch.cat([x[:, : offset + 2], torch.full((3, 5), SPECIAL.mask)], 1)
    segs = torch.cat([seg[:, : offset + 2], torch.ones(3, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        full = model.logits(model(ids=ids, segment_ids=segs, layout=full_layout(offset, new)))[:, offset:]
        cache = model.new_cache(max_length=20)
        model(ids=ids[:, :offset], segment_ids=segs[:, :offset], causal=True, cache=cache)
        cached = model.logits(model(ids=ids[:, offset:], segment_ids=segs[:, offset:], cache=cache, layout=new))
    torch.testing.assert_close(cached, full, **TOL)
    assert cache.length == offset + 7
    # per-row layouts ([B, L]) give each row its own
    rows = BlockLayout(new.block.repeat(3, 1), new.clean.repeat(3, 1), new.positions.repeat(3, 1))
    cache.truncate(offset)
    with torch.no_grad():
        again = model.logits(model(ids=ids[:, offset:], segment_ids=segs[:, offset:], cache=cache, layout=rows))
    torch.testing.assert_close(again, full, **TOL)
    # the clean tokens see no mask: their outputs are the causal pass's
    with torch.no_grad():
        causal = model.logits(model(ids=ids[:, : offset + 2], segment_ids=segs[:, : offset + 2], causal=True))
    torch.testing.assert_close(cached[:, :2], causal[:, offset:], **TOL)


def test_a_cached_block_layout_call_appends_at_the_end_and_takes_no_causal_flag():
    from diffuse.models.layers import BlockLayout

    model = tiny_transformer()
    x, seg = left_padded([4, 2], 4)
    cache = model.new_cache(max_length=9)
    layout = BlockLayout(torch.tensor([0, 0]), torch.tensor([False, False]), torch.tensor([0, 1]))
    with torch.no_grad():
        model(ids=x, segment_ids=seg, causal=True, cache=cache)
        with pytest.raises(DiffuseError, match="no causal flag"):
            model(ids=x[:, :2], cache=cache, layout=layout, causal=True)
        cache.seek(1)
        with pytest.raises(DiffuseError, match="appends at its end") as err:
            model(ids=x[:, :2], cache=cache, layout=layout)
    assert "\n" not in str(err.value) and cache.length == 4  # nothing written
