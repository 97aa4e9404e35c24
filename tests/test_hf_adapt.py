"""model=hf beyond plain causal LMs (issue 27 items 2-4): remote-code diffusion folders (trust_remote_code, the
folder's mask_token_id, Dream's logit shift), A2D (a [MASK] added at the mean embedding, DiffuLLaMA's attention
annealing) and LoRA through peft. The remote folder is diffuse's own format=remote file, written here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import call_main, tiny_args, tiny_transformer
from diffuse.data.tokenizers import ByteTokenizer, HFTokenizer
from diffuse.errors import DiffuseError
from diffuse.models.hf import HFCausalLM
from diffuse.models.hf_adapt import annealed_mask
from diffuse.models.layers import attention_mask
from diffuse.models.portable.remote import copy_modeling_file, remote_config, remote_state_dict


def tokenizer_without_mask() -> PreTrainedTokenizerFast:
    """diffuse's byte tokenizer with [MASK] in its vocabulary but not declared (as LLaDA's folder leaves it)."""
    tok = ByteTokenizer()()
    return PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def write_remote_folder(folder):
    """A LLaDA-style folder: config.json with auto_map + mask_token_id, modeling_diffuse.py, weights, tokenizer."""
    tok = tokenizer_without_mask()
    net = tiny_transformer(len(tok), seed=1)
    special = {"pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id,
               "mask": tok.convert_tokens_to_ids("[MASK]")}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(remote_config(net, 10_000.0, False, special, None)))
    save_file(remote_state_dict(net), str(folder / "model.safetensors"))
    copy_modeling_file(folder)
    tok.save_pretrained(str(folder))
    return net, special


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote") / "llada_like"
    net, special = write_remote_folder(folder)
    return folder, net, special


def two_documents(B=2, L=12, V=256):
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0))
    seg = torch.ones(B, L, dtype=torch.long)
    seg[:, 5:] = 2
    seg[1, -2:] = 0
    return ids, seg


def test_a_remote_code_folder_is_a_backbone_with_its_own_mask_id_and_logits(remote):
    folder, net, special = remote
    tok = HFTokenizer(str(folder))()
    assert tok.mask_token_id == special["mask"] and len(tok) == net.vocab_size  # from config.json: nothing added
    model = HFCausalLM(vocab_size=len(tok), base_model=str(folder), trust_remote_code=True).eval()
    assert model.mask_token_id == special["mask"] and type(model.model).__name__ == "DiffuseModel"
    ids, seg = two_documents()
    with torch.no_grad():
        ours = net.logits(net(ids=ids, segment_ids=seg))  # positions run on across documents; RoPE is relative
        theirs = model.logits(model(ids=ids, segment_ids=seg))
    real = seg > 0
    assert (ours - theirs)[real].abs().max() < 1e-5


def test_logit_shift_reads_position_i_from_position_i_minus_1(remote):
    folder, _, _ = remote
    plain = HFCausalLM(vocab_size=260, base_model=str(folder), trust_remote_code=True).eval()
    shifted = HFCausalLM(vocab_size=260, base_model=str(folder), trust_remote_code=True, logit_shift=True).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = plain.logits(plain(ids=ids)), shifted.logits(shifted(ids=ids))
    assert torch.equal(b[:, 1:], a[:, :-1]) and torch.equal(b[:, 0], a[:, 0])


def test_a_mask_token_id_that_is_not_the_tokenizers_is_one_line(remote, corpus, tmp_path):
    folder, _, special = remote
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path, "model=hf", f"model.base_model={folder}",
                                                   "model.trust_remote_code=true", "tokenizer=hf",
                                                   f"tokenizer.path={folder}", "model.mask_token_id=3"))
    assert result.returncode == 2, result
    assert f"error: model.mask_token_id=3 is not the [MASK] the objective uses (id {special['mask']}" in result.stderr


def test_a_remote_folder_fine_tunes_with_llada_samples_and_evaluates(remote, corpus, tmp_path):
    folder, _, _ = remote
    common = ("model=hf", f"model.base_model={folder}", "model.trust_remote_code=true", "tokenizer=hf",
              f"tokenizer.path={folder}", "model.d_model=null", "model.n_layers=null")
    trained = call_main("diffuse.train", *tiny_args(corpus, tmp_path / "run", *common, "objective=llada",
                                                    "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert trained.returncode == 0, trained
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val/nelbo"] > 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for sampler in ("llada", "remask", "ancestral", "threshold", "eb"):  # the absorbing samplers
        sampled = call_main("diffuse.sample", f"ckpt={ckpt}", "num_samples=2", "length=8", "steps=4",
                            f"sampler={sampler}", f"hydra.run.dir={tmp_path / sampler}")
        assert sampled.returncode == 0, (sampler, sampled)
        assert len((tmp_path / sampler / "samples.jsonl").read_text().splitlines()) == 2
    evaluated = call_main("diffuse.evaluate", f"ckpt={ckpt}", "data=text", f"data.path={corpus}", "num_samples=0",
                          f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated


# -- A2D: a causal LM adapted into diffusion ----------------------------------------------------------
def write_llama_folder(folder, tie: bool = False):
    """A tiny causal Llama and a word-level tokenizer without [MASK] (the usual causal-LM folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from conftest import WORDS

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[BOS]", "[EOS]", *dict.fromkeys(w.lower() for w in WORDS),
                                         "."])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                  eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return len(tok)


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("causal") / "llama"
    return folder, write_llama_folder(folder)


def test_an_added_mask_token_starts_at_the_mean_embedding(causal_lm):
    folder, vocab = causal_lm
    tok = HFTokenizer(str(folder))()
    assert len(tok) == vocab + 1 and tok.mask_token_id == vocab  # the causal LM had no [MASK]
    model = HFCausalLM(vocab_size=len(tok), base_model=str(folder))
    original = LlamaForCausalLM.from_pretrained(str(folder))
    for new, old in ((model.model.get_input_embeddings(), original.get_input_embeddings()),
                     (model.model.get_output_embeddings(), original.get_output_embeddings())):  # untied: both
        assert torch.equal(new.weight[:vocab], old.weight)
        assert torch.allclose(new.weight[vocab], old.weight.mean(0), atol=1e-7)


def test_annealing_goes_from_causal_to_the_bidirectional_mask():
    ids, seg = two_documents(B=2, L=48)
    causal, full = attention_mask(seg, True, 48), attention_mask(seg, False, 48)
    assert torch.equal(annealed_mask(seg, 0.0), causal) and torch.equal(annealed_mask(seg, 1.0), full)
    opened = []
    for r in (0.25, 0.5, 0.75):
        mask = annealed_mask(seg, r, torch.Generator().manual_seed(0))
        assert torch.equal(mask & causal, causal) and torch.equal(mask & ~full, torch.zeros_like(mask))  # in between
        opened.append(((mask & ~causal).sum() / (full & ~causal).sum()).item())
    assert opened == pytest.approx([0.25, 0.5, 0.75], abs=0.04)  # Bernoulli(r) over the non-causal pairs
    model = HFCausalLM(vocab_size=260, config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                               "num_hidden_layers": 1, "num_attention_heads": 2}, anneal_steps=10)
    ids = ids % 260
    with torch.no_grad():
        as_causal = model(ids=ids, segment_ids=seg, causal=True)
        as_full = model.eval()(ids=ids, segment_ids=seg)  # evaluation and sampling: bidirectional
        model.train()
        steps = {}
        for model.global_step in (0, 5, 10, 20):
            steps[model.global_step] = model(ids=ids, segment_ids=seg)
    real = seg > 0
    assert torch.equal(steps[0][real], as_causal[real])  # step 0: r = 0, the causal LM as it was
    assert torch.equal(steps[10][real], as_full[real]) and torch.equal(steps[20][real], as_full[real])  # r = 1
    assert not torch.equal(steps[5][real], as_causal[real]) and not torch.equal(steps[5][real], as_full[real])


def test_recipe_a2d_adapts_a_causal_lm_folder(causal_lm, corpus, tmp_path):
    folder, vocab = causal_lm
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path, "recipe=a2d", f"model.base_model={folder}",
                                                   "tokenizer=hf", f"tokenizer.path={folder}", "model.d_model=null",
                                                   "model.n_layers=null", "model.anneal_steps=2",
                                                   "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert result.returncode == 0, result
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"]["backbone.model.model.embed_tokens.weight"].shape[0] == vocab + 1
    assert ckpt["diffuse"]["config"]["model"]["logit_shift"] is True


# -- LoRA ------------------------------------------------------------------------------------------
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def test_only_the_lora_adapters_train(causal_lm):
    folder, vocab = causal_lm
    model = HFCausalLM(vocab_size=vocab + 1, base_model=str(folder), lora=LORA)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers × (q_proj, v_proj) × r·(in + out) = 2 · 2 · 4 · (32 + 32)
    assert sum(trainable.values()) == 1024
    assert sum(p.numel() for p in model.parameters()) > 20 * 1024
    with pytest.raises(DiffuseError, match=r"^model.lora.rank is not a LoRA key \(r, alpha, dropout, target_modules\)$"):
        HFCausalLM(vocab_size=vocab + 1, base_model=str(folder), lora={"rank": 4})


def test_lora_fine_tunes_and_exports_merged(causal_lm, corpus, tmp_path):
    from diffuse.export import export, load_exported
    from diffuse.run.load import load_run

    folder, _ = causal_lm
    lora = "{r:4,alpha:8,dropout:0.0,target_modules:[q_proj,v_proj]}"
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path / "run", "model=hf", f"model.base_model={folder}",
                                                   "tokenizer=hf", f"tokenizer.path={folder}", "model.d_model=null",
                                                   "model.n_layers=null", f"model.lora={lora}", "objective=llada",
                                                   "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert result.returncode == 0, result
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    adapters = {k: v for k, v in state.items() if "lora_B" in k}
    assert len(adapters) == 4 and any(v.abs().max() > 0 for v in adapters.values())  # B starts at 0: it trained
    base = LlamaForCausalLM.from_pretrained(str(folder)).state_dict()
    key = "backbone.model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(state[key], base["model.layers.0.self_attn.q_proj.weight"])  # the base stayed frozen

    out = export(str(ckpt), str(tmp_path / "merged"), merge_lora=True)
    _, tok, unmerged = load_run(str(ckpt))
    cfg, _, merged = load_exported(str(out))
    assert cfg.model.lora is None and not any("lora" in k for k in merged.backbone.state_dict())
    ids, seg = two_documents(V=len(tok))
    with torch.no_grad():
        a = unmerged.backbone.logits(unmerged.backbone(ids=ids, segment_ids=seg))
        b = merged.backbone.logits(merged.backbone(ids=ids, segment_ids=seg))
    assert (a - b).abs().max() < 1e-5


LLADA_LIKE = '''"""LLaDA's forward signature over diffuse's modeling file: a 4D pattern only as `attention_bias`, `attention_mask`
a 2D padding mask, no `position_ids` (LLaDA numbers the positions itself)."""
from .modeling_diffuse import DiffuseModel


class LLaDALikeModel(DiffuseModel):
    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, attention_bias=None,
                past_key_values=None, use_cache=False):
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("LLaDA-like: attention_mask must be a 2D padding mask")
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds,
                               attention_mask=attention_bias if attention_bias is not None else attention_mask)
'''


def test_a_folder_with_llada_s_forward_signature_gets_the_pattern_as_attention_bias(remote, tmp_path):
    """LLaDA's modeling file takes no position_ids and only a 2D attention_mask: the backbone hands it the 4D
    pattern as attention_bias and lets it number the positions, with the same logits (RoPE is relative and packed
    documents never see each other)."""
    import shutil

    folder, net, _ = remote
    llada = tmp_path / "llada_signature"
    shutil.copytree(folder, llada)
    (llada / "modeling_llada_like.py").write_text(LLADA_LIKE)
    config = json.loads((llada / "config.json").read_text())
    config["auto_map"] = {**config["auto_map"], "AutoModel": "modeling_llada_like.LLaDALikeModel"}
    config["architectures"] = ["LLaDALikeModel"]
    (llada / "config.json").write_text(json.dumps(config))
    model = HFCausalLM(vocab_size=net.vocab_size, base_model=str(llada), trust_remote_code=True).eval()
    assert type(model.model).__name__ == "LLaDALikeModel" and model.remote_keywords == ("attention_bias", False)
    ids, seg = two_documents()
    with torch.no_grad():
        ours = net.logits(net(ids=ids, segment_ids=seg))
        theirs = model.logits(model(ids=ids, segment_ids=seg))
    assert (ours - theirs)[seg > 0].abs().max() < 1e-5
