"""Export to a plain Hugging Face-style folder reloads to identical logits and tokenizer."""

import torch

from diffuse.run.load import load_run
from diffuse.export import export, load_exported


def test_export_reloads_to_identical_logits(debug_run, tmp_path):
    ckpt = str(debug_run / "checkpoints" / "last.ckpt")
    out = export(ckpt, str(tmp_path / "export"))
    assert {"model.safetensors", "diffuse_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    _, tok, module = load_run(ckpt)
    _, tok2, module2 = load_exported(str(out))
    text = "The for statement is used to iterate — naïve café"
    ids = torch.tensor([tok(text)["input_ids"]])
    assert tok2(text)["input_ids"] == ids[0].tolist()
    assert (tok2.mask_token_id, tok2.pad_token_id) == (tok.mask_token_id, tok.pad_token_id)
    with torch.no_grad():
        a = module.backbone.logits(module.backbone(ids=ids))
        b = module2.backbone.logits(module2.backbone(ids=ids))
    assert torch.equal(a, b)


def test_export_never_overwrites_a_non_empty_folder_unless_asked(debug_run, tmp_path):
    from conftest import call_main, error_lines

    ckpt = debug_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "mine"
    out.mkdir()
    (out / "tokenizer.json").write_text("the user's own file")
    refused = call_main("diffuse.export", f"ckpt={ckpt}", f"out={out}")
    assert refused.returncode == 2 and error_lines(refused.stderr)[0].startswith(f"error: out={out} is not empty")
    assert (out / "tokenizer.json").read_text() == "the user's own file"
    (out / "notes.txt").write_text("kept")
    done = call_main("diffuse.export", f"ckpt={ckpt}", f"out={out}", "overwrite=true")
    assert done.returncode == 0, done
    assert (out / "notes.txt").read_text() == "kept" and (out / "model.safetensors").is_file()
    assert list(tmp_path.iterdir()) == [out]  # the export's run dir wrote nothing beside it


def test_an_export_folder_that_cannot_be_made_is_one_line(debug_run, tmp_path):
    from conftest import call_main, error_lines

    (tmp_path / "afile").write_text("x")
    result = call_main("diffuse.export", f"ckpt={debug_run / 'checkpoints' / 'last.ckpt'}",
                       f"out={tmp_path / 'afile' / 'inside'}")
    assert result.returncode == 2, result
    assert error_lines(result.stderr) == [f"error: out={tmp_path / 'afile' / 'inside'} cannot be created (Not a directory)"]


def test_the_command_passes_merge_lora(debug_run, tmp_path):
    """conf/export.yaml's merge_lora reaches export() (it was dropped: a LoRA-less run 'merged' without a word)."""
    from conftest import call_main, error_lines

    ckpt = debug_run / "checkpoints" / "last.ckpt"
    result = call_main("diffuse.export", f"ckpt={ckpt}", f"out={tmp_path / 'm'}", "merge_lora=true")
    assert result.returncode == 2 and error_lines(result.stderr)[0].startswith(
        "error: merge_lora=true, but this run has no LoRA adapters"), result
    result = call_main("diffuse.export", f"ckpt={ckpt}", f"out={tmp_path / 'm'}", "merge_lora=maybe")
    assert error_lines(result.stderr) == ["error: merge_lora=maybe must be true or false"], result
    assert not (tmp_path / "m").exists()
