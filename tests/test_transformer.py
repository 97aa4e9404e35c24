"""The transformer backbone: causality, padding and packing invariance, KV cache, time conditioning."""

import pytest
import torch

from conftest import SPECIAL, VOCAB, tiny_transformer
from diffuse.errors import DiffuseError

TOL = {"rtol": 1e-4, "atol": 1e-5}


def ids(B, L, seed=0):
    return torch.randint(0, 36, (B, L), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kw):
    with torch.no_grad():
        return model.logits(model(ids=x, **kw))


@pytest.mark.parametrize("causal", [True, False])
def test_causal_backbone_does_not_see_the_future_bidirectional_does(causal):
    model = tiny_transformer()
    x = ids(2, 16)
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 36
    a, b = logits(model, x, causal=causal), logits(model, y, causal=causal)
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    if causal:  # positions before the change cannot see it
        torch.testing.assert_close(a[:, :10], b[:, :10], **TOL)
    else:  # bidirectional: they do
        assert (a[:, :10] - b[:, :10]).abs().amax() > 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_padded_batch_equals_each_row_alone(causal):
    model = tiny_transformer()
    lengths = [16, 9, 4]
    x = ids(3, 16, seed=1)
    seg = torch.zeros_like(x)
    for r, n in enumerate(lengths):
        seg[r, :n] = 1
        x[r, n:] = SPECIAL.pad
    batch = logits(model, x, segment_ids=seg, causal=causal)
    for r, n in enumerate(lengths):
        alone = logits(model, x[r : r + 1, :n], causal=causal)
        torch.testing.assert_close(batch[r, :n], alone[0], **TOL)
    assert torch.isfinite(batch).all()  # padding rows attend to themselves only: no NaN


@pytest.mark.parametrize("causal", [True, False])
def test_two_packed_documents_equal_each_alone(causal):
    model = tiny_transformer()
    a, b = ids(1, 7, seed=2), ids(1, 9, seed=3)
    row = torch.cat([a, b], 1)
    seg = torch.tensor([[1] * 7 + [2] * 9])
    packed = logits(model, row, segment_ids=seg, causal=causal)
    torch.testing.assert_close(packed[:, :7], logits(model, a, causal=causal), **TOL)
    torch.testing.assert_close(packed[:, 7:], logits(model, b, causal=causal), **TOL)
    # without segment ids the documents do see each other (so the test above can fail)
    together = logits(model, row, causal=causal)
    assert (together[:, 7:] - packed[:, 7:]).abs().amax() > 1e-4


def test_kv_cache_gives_the_same_logits_as_a_full_forward():
    model = tiny_transformer()
    x = ids(2, 12, seed=4)
    seg = torch.ones_like(x)
    seg[1, :3] = 0  # a left-padded row, as the AR sampler builds them
    x[1, :3] = SPECIAL.pad
    full = logits(model, x, segment_ids=seg, causal=True)
    cache = model.new_cache(max_length=12)
    with torch.no_grad():
        steps = [model.logits(model(ids=x[:, :5], segment_ids=seg[:, :5], causal=True, cache=cache))]
        for j in range(5, 12):
            steps.append(model.logits(model(ids=x[:, j : j + 1], causal=True, cache=cache)))
    real = seg.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], **TOL)
    assert cache.length == 12


def test_time_conditioning_changes_the_output_with_t():
    model = tiny_transformer(time_conditioning=True)
    assert model.time_conditioned and not tiny_transformer().time_conditioned
    x = ids(2, 8, seed=5)
    early = logits(model, x, t=torch.tensor([0.1, 0.1]))
    late = logits(model, x, t=torch.tensor([0.9, 0.9]))
    assert (early - late).abs().amax() > 1e-4
    per_row = logits(model, x, t=torch.tensor([0.1, 0.9]))  # t is per row
    torch.testing.assert_close(per_row[0], early[0], **TOL)
    torch.testing.assert_close(per_row[1], late[1], **TOL)
    with pytest.raises(DiffuseError, match="time_conditioning"):
        model(ids=x)


def test_embeds_input_equals_ids_input():
    model = tiny_transformer()
    x = ids(2, 8, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model(embeds=model.embed(x)), model(ids=x))


def test_weight_tying_and_vocab_size():
    tied, untied = tiny_transformer(), tiny_transformer(tie_weights=False)
    assert tied.head.weight is tied.tok_emb.weight and untied.head.weight is not untied.tok_emb.weight
    assert logits(tied, ids(1, 4)).shape == (1, 4, VOCAB)


def test_heads_must_divide_the_width():
    with pytest.raises(DiffuseError, match="n_heads"):
        tiny_transformer(d_model=30, n_heads=4)
