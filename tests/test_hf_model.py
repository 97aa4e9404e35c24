"""model=hf: any transformers causal LM as a bidirectional backbone with a document/padding mask."""

from __future__ import annotations

import pytest
import torch

from diffuse.errors import DiffuseError
from diffuse.models.hf import HFCausalLM, document_positions

TINY = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
V = 40


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HFCausalLM(vocab_size=V, config=TINY).eval()


def logits_of(m, ids, seg=None, causal=False):
    with torch.no_grad():
        return m.logits(m(ids=ids, segment_ids=seg, causal=causal))


def test_padded_batch_equals_each_row_alone(model):
    rows = [torch.randint(4, V, (n,)) for n in (9, 5, 7)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    seg = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)], seg[r, : len(row)] = row, 1
    batched = logits_of(model, ids, seg)
    for r, row in enumerate(rows):
        alone = logits_of(model, row[None], torch.ones(1, len(row), dtype=torch.long))
        torch.testing.assert_close(batched[r, : len(row)], alone[0], rtol=1e-4, atol=1e-4)
    # padding is invisible: changing what sits in the padded slots changes no real position
    noisy = ids.masked_fill(seg == 0, 7)
    torch.testing.assert_close(logits_of(model, noisy, seg)[seg > 0], batched[seg > 0])


def test_packed_documents_do_not_see_each_other(model):
    a, b = torch.randint(4, V, (6,)), torch.randint(4, V, (5,))
    ids = torch.cat([a, b])[None]
    seg = torch.tensor([[1] * 6 + [2] * 5])
    packed = logits_of(model, ids, seg)
    torch.testing.assert_close(packed[0, 6:], logits_of(model, b[None], torch.ones(1, 5, dtype=torch.long))[0],
                               rtol=1e-4, atol=1e-4)
    other = ids.clone()
    other[0, :6] = torch.randint(4, V, (6,))
    torch.testing.assert_close(logits_of(model, other, seg)[0, 6:], packed[0, 6:])
    assert document_positions(seg).tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]


def test_bidirectional_by_default_causal_on_request(model):
    ids = torch.randint(4, V, (1, 8))
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % V
    assert not torch.allclose(logits_of(model, ids)[0, 0], logits_of(model, later)[0, 0])
    torch.testing.assert_close(logits_of(model, ids, causal=True)[0, :-1], logits_of(model, later, causal=True)[0, :-1])


def test_embeds_path_and_eager_attention_agree(model):
    ids = torch.randint(4, V, (2, 6))
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        via_embeds = model.logits(model(embeds=model.embed(ids), segment_ids=seg))
    torch.testing.assert_close(via_embeds, logits_of(model, ids, seg))
    eager = HFCausalLM(vocab_size=V, config=TINY, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits_of(eager, ids, seg)[seg > 0], logits_of(model, ids, seg)[seg > 0],
                               rtol=1e-4, atol=1e-4)


def test_generic_size_keys_and_vocab_from_tokenizer():
    m = HFCausalLM(vocab_size=57, config=TINY, d_model=48, n_layers=1)
    cfg = m.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (48, 1, 57)
    assert all(k.startswith("model.") for k in m.state_dict())  # each weight once, under its HF name
    assert m.time_conditioned is False and m.logits(m(ids=torch.zeros(1, 3, dtype=torch.long))).shape == (1, 3, 57)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    m = HFCausalLM(vocab_size=V, config=TINY, gradient_checkpointing=True).train()
    m.load_state_dict(model.state_dict())
    assert m.model.is_activation_checkpointing
    plain = HFCausalLM(vocab_size=V, config=TINY).train()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(4, V, (2, 6))
    for net in (m, plain):
        net.logits(net(ids=ids, segment_ids=torch.ones_like(ids))).logsumexp(-1).mean().backward()
    for (name, a), b in zip(m.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_local_pretrained_folder_loads_and_grows_vocab(tmp_path, model):
    model.model.save_pretrained(tmp_path / "tiny")
    loaded = HFCausalLM(vocab_size=V + 3, base_model=str(tmp_path / "tiny")).eval()  # tokenizer added 3 tokens
    assert loaded.model.get_input_embeddings().num_embeddings == V + 3
    ids = torch.randint(4, V, (1, 7))
    torch.testing.assert_close(logits_of(loaded, ids)[..., :V], logits_of(model, ids), rtol=1e-4, atol=1e-4)


def test_unreachable_names_fail_in_one_line(tmp_path):
    with pytest.raises(DiffuseError, match="local folder"):
        HFCausalLM(vocab_size=V, base_model="no-such-org/no-such-model-diffuse-test")
    with pytest.raises(DiffuseError, match="is not a folder"):
        HFCausalLM(vocab_size=V, base_model=str(tmp_path / "missing"))
    with pytest.raises(DiffuseError, match="model_type"):
        HFCausalLM(vocab_size=V, config={"model_type": "not-a-model"})
