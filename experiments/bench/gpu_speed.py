"""The two speed sections of experiments/bench/gpu_check.py; imported by it, not run alone.

P4 — forward + backward of d_model × n_layers stacks on [batch, L, d_model] inputs under bf16 autocast:
  ours       diffuse.models.mamba2.Mamba2 (two scans per block, mamba-ssm's chunk-scan kernel on CUDA when
             importable), with segment ids (all ones, as the data module always sends them: run-aware conv,
             in-place reversal by gather) and without (plain conv, flip);
  mamba-ssm  mamba_ssm's own Mamba2 layer (one direction, fused conv + scan + norm), pre-norm residual stack;
  SDPA       diffuse.models.transformer.Transformer (attention + SwiGLU per block, no mask: the flash path).
  Same widths for ours and mamba-ssm: d_state 128, headdim 64, expand 2, chunk 256 (mamba-ssm's defaults).

P6 / P1 — a transformer through `diffuse.train.train` (the config composed as `python -m diffuse.train` would,
default callbacks, trainer=gpu for bf16-mixed) with `CompileAndTime` added (torch.compile of the backbone's
forward, and a timer that syncs the device at its first and last step), then a bare PyTorch loop over the
same module object, data loader, objective loss, noise streams, fused AdamW, LR schedule and gradient
clipping, in the same process. MFU = tokens/s × (6·N + 12·layers·d_model·L) / peak (nanoGPT's count, the
head on every position; N counts the tied embedding once).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

from diffuse.core.noise import noise_generator, training_stream

# dense bf16 peak of the chips we may be lent, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "GH200": 989.4e12, "A100": 312e12, "B200": 2250e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# -- P4 -----------------------------------------------------------------------------------------------
class MambaSSMStack(nn.Module):
    """x + Mamba2(RMSNorm x) per layer, then a final RMSNorm: mamba_ssm's layer in the residual stack ours uses."""

    def __init__(self, d_model: int, n_layers: int, **mixer):
        super().__init__()
        from mamba_ssm.modules.mamba2 import Mamba2 as MambaSSMMamba2

        self.norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(n_layers))
        self.layers = nn.ModuleList(MambaSSMMamba2(d_model, **mixer) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)

    def forward(self, x):
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return self.norm(x)


def mamba_ssm_missing(device: torch.device) -> str | None:
    """Why mamba-ssm's layer cannot run here, or None."""
    if device.type != "cuda":
        return "mamba-ssm needs CUDA"
    try:
        import mamba_ssm  # noqa: F401
        from mamba_ssm.modules.mamba2 import Mamba2  # noqa: F401
    except Exception as err:  # ImportError, or a CUDA / Triton failure while importing
        return f"mamba_ssm not importable ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
    return None


def time_fwd_bwd(fn, params, x, device, bf16: bool, warmup: int, reps: int) -> tuple[float, float]:
    """Median ms of forward + backward of mean(fn(x)²) and the peak memory in GiB (CUDA; NaN on CPU)."""
    def step():
        for p in params:
            p.grad = None
        with autocast(device, bf16):
            out = fn(x)
        out.float().square().mean().backward()

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return statistics.median(times), peak


def p4_models(size, device):
    """{name: (callable of x, its parameters)} plus the reason mamba-ssm is missing (or None)."""
    from diffuse.models.mamba2 import Mamba2, kernel_scan
    from diffuse.models.transformer import Transformer

    d, layers = size.p4_d_model, size.p4_layers
    mixer = dict(d_state=size.p4_d_state, headdim=size.p4_headdim, expand=2, chunk_size=size.p4_chunk)
    torch.manual_seed(0)
    ours = Mamba2(vocab_size=256, d_model=d, n_layers=layers, d_conv=4, ngroups=1, **mixer).to(device)
    sdpa = Transformer(vocab_size=256, d_model=d, n_layers=layers, n_heads=max(1, d // 64)).to(device)
    models = {
        "ours, segment ids": (lambda x, seg: ours(embeds=x, segment_ids=seg), list(ours.parameters())),
        "ours, no segment ids": (lambda x, seg: ours(embeds=x), list(ours.parameters())),
        "SDPA transformer": (lambda x, seg: sdpa(embeds=x), list(sdpa.parameters())),
    }
    missing = mamba_ssm_missing(device)
    if missing is None:
        ref = MambaSSMStack(d, layers, d_conv=4, ngroups=1, **mixer).to(device)
        models["mamba-ssm Mamba2"] = (lambda x, seg: ref(x), list(ref.parameters()))
    n_params = {"ours": sum(p.numel() for p in ours.parameters()) - ours.tok_emb.weight.numel(),
                "SDPA transformer": sum(p.numel() for p in sdpa.parameters()) - sdpa.tok_emb.weight.numel()}
    if missing is None:
        n_params["mamba-ssm Mamba2"] = sum(p.numel() for p in ref.parameters())
    return models, n_params, missing, device.type == "cuda" and kernel_scan() is not None


def run_p4(size, device, bf16: bool, out) -> dict:
    """One row per L: ms of each model, the ratios ours / mamba-ssm. `out(line)` writes the report."""
    models, n_params, missing, kernel = p4_models(size, device)
    out(f"d_model {size.p4_d_model} × {size.p4_layers} layers, batch {size.p4_batch}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}; d_state {size.p4_d_state}, headdim {size.p4_headdim}, "
        f"chunk {size.p4_chunk}; median of {size.p4_reps} after {size.p4_warmup} warm-up")
    out(f"ours scans with: {'mamba-ssm mamba_chunk_scan_combined' if kernel else 'the pure-PyTorch SSD scan'}; "
        + "parameters (no embedding): " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in n_params.items()))
    if missing:
        out(f"mamba-ssm Mamba2: skipped: {missing}")
    names = list(models)
    out("")
    out("| L | " + " | ".join(f"{n} ms (GiB)" for n in names) + " | ours seg / mamba-ssm | ours no-seg / mamba-ssm |")
    out("|---" * (len(names) + 3) + "|")
    results = {}
    for length in size.p4_lengths:
        x = torch.randn(size.p4_batch, length, size.p4_d_model, device=device)
        seg = torch.ones(size.p4_batch, length, dtype=torch.long, device=device)
        row = {}
        for name in names:
            fn, params = models[name]
            reps = size.p4_reps if length < 65536 else max(2, size.p4_reps // 2)
            try:
                row[name] = time_fwd_bwd(lambda t: fn(t, seg), params, x, device, bf16, size.p4_warmup, reps)
            except torch.OutOfMemoryError:
                row[name] = (math.nan, math.nan)
                torch.cuda.empty_cache()
        ref = row.get("mamba-ssm Mamba2", (math.nan,))[0]
        ratios = [row[n][0] / ref if ref == ref else math.nan for n in ("ours, segment ids", "ours, no segment ids")]
        cells = [f"{row[n][0]:.1f}" + (f" ({row[n][1]:.1f})" if row[n][1] == row[n][1] else "") for n in names]
        out(f"| {length} | " + " | ".join(cells) + " | " + " | ".join(
            f"{r:.2f}×" if r == r else "n/a" for r in ratios) + " |")
        results[length] = {"ms": {n: row[n][0] for n in names}, "ratio_seg": ratios[0], "ratio_noseg": ratios[1]}
    targets = {label: [r[key] for r in results.values() if math.isfinite(r[key])]
               for key, label in (("ratio_seg", "with segment ids (as training runs)"), ("ratio_noseg", "without"))}
    if any(targets.values()):
        out("")
    for label, ratios in targets.items():
        if ratios:
            out(f"target: ours ≤ 2.2× mamba-ssm at every L, {label}: worst {max(ratios):.2f}× "
                f"({'met' if max(ratios) <= 2.2 and len(ratios) == len(results) else 'NOT met'})")
    return results


# -- P6 / P1 --------------------------------------------------------------------------------------------
class CompileAndTime(L.Callback):
    """Added to the default callbacks for the P6 run: compiles the backbone's forward in place (an instance
    attribute over the bound method: state-dict keys unchanged), times steps start_step…last with a device
    sync at both ends, and hands its module, data module and compiled forward to the bare loop after fit.
    Validation after fit runs eager (the compiled forward is removed at train end: no eval-mode compile)."""

    last: CompileAndTime | None = None

    def __init__(self, compile: bool = True, start_step: int = 5):
        self.compile, self.start_step = compile, start_step
        self.compiled = self.module = self.datamodule = None
        self.t0 = self.t1 = None
        self.step0 = self.steps = 0

    def setup(self, trainer, pl_module, stage):
        CompileAndTime.last = self
        self.module = pl_module
        if self.compile and stage == "fit" and self.compiled is None:
            self.compiled = torch.compile(pl_module.backbone.forward)
            pl_module.backbone.forward = self.compiled

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in (self.start_step, trainer.max_steps):  # two syncs in the run, none between
            sync(pl_module.device)
            if trainer.global_step == self.start_step:
                self.t0, self.step0 = time.perf_counter(), trainer.global_step
            else:
                self.t1, self.steps = time.perf_counter(), trainer.global_step - self.step0

    def on_train_end(self, trainer, pl_module):
        if self.t1 is None:  # stopped before max_steps
            sync(pl_module.device)
            self.t1, self.steps = time.perf_counter(), trainer.global_step - self.step0
        self.datamodule = trainer.datamodule
        if self.compiled is not None:
            del pl_module.backbone.forward


def bare_loop(module, datamodule, device, bf16: bool, compiled, warmup: int, steps: int, clip: float,
              seed: int) -> float:
    """The training step with nothing around it; returns tokens/s over `steps` after `warmup` (device-synced)."""
    backbone, objective = module.backbone, module.objective
    if compiled is not None:
        backbone.forward = compiled  # the same compiled function: its graphs are reused
    module.to(device).train()
    optim = module.configure_optimizers()
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    params = [p for p in module.parameters() if p.requires_grad]
    loader = iter(datamodule.train_dataloader())
    tokens = 0

    def step(i: int) -> int:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
        gen = noise_generator(seed, training_stream(i, 0, 1), device)
        with autocast(device, bf16):
            loss = objective.loss(backbone, batch, gen, train=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return batch["input_ids"].numel()

    try:
        for i in range(warmup):
            step(i)
        sync(device)
        start = time.perf_counter()
        for i in range(warmup, warmup + steps):
            tokens += step(i)
        sync(device)
        return tokens / (time.perf_counter() - start)
    finally:
        if compiled is not None:
            del backbone.forward


def padded_byte_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A Hugging Face tokenizer folder: diffuse's byte tokenizer (256 bytes + 4 specials) with unused entries
    up to `vocab_size`, so the embedding and head have GPT-2's size while the text stays bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from diffuse.data.tokenizers import SPECIALS

    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"<unused{i}>": len(vocab) + i for i in range(vocab_size - len(vocab) - len(SPECIALS))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS.values()))
    PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS).save_pretrained(folder)
    return folder


def compose_train_config(overrides: list[str], run_dir: Path):
    """The config `python -m diffuse.train overrides…` would run, for train() in this process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from diffuse.core.paths import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


def run_p6(size, device, data: Path, work: Path, compile: bool, out) -> dict:
    from omegaconf import open_dict

    from diffuse.train import train

    bf16 = device.type == "cuda"
    tok = padded_byte_tokenizer(work / "tokenizer", size.p6_vocab)
    steps = size.p6_warmup + size.p6_steps
    overrides = [
        "data=text", f"data.path={data}", "tokenizer=hf", f"tokenizer.path={tok}",
        f"model.d_model={size.p6_d_model}", f"model.n_layers={size.p6_layers}", f"model.n_heads={size.p6_heads}",
        f"data.seq_len={size.p6_seq_len}", f"data.batch_size={size.p6_batch}", f"data.eval_batch_size={size.p6_batch}",
        f"trainer={'gpu' if bf16 else 'default'}", f"trainer.accelerator={'gpu' if bf16 else 'cpu'}",
        f"trainer.max_steps={steps}", "trainer.val_check_interval=1000000", "trainer.limit_val_batches=1",
        "num_samples=0", f"paths.cache_dir={work / 'cache'}",
    ]
    cfg = compose_train_config(overrides, work / "run")
    with open_dict(cfg):
        cfg.callbacks["compile_and_time"] = {"_target_": "gpu_speed.CompileAndTime", "compile": compile,
                                             "start_step": size.p6_warmup}
    CompileAndTime.last = None
    wall = time.perf_counter()
    metrics = train(cfg)
    wall = time.perf_counter() - wall
    timer = CompileAndTime.last
    module = timer.module
    tokens_per_step = size.p6_batch * size.p6_seq_len
    framework = timer.steps * tokens_per_step / (timer.t1 - timer.t0)
    callback_rate = metrics.get("train/tokens_per_sec") or math.nan
    bare = bare_loop(module, timer.datamodule, device, bf16, timer.compiled, size.p6_warmup, size.p6_steps,
                     float(cfg.trainer.gradient_clip_val or 0.0) or math.inf, int(cfg.seed))
    n_params = sum(p.numel() for p in module.backbone.parameters())
    flops = 6 * n_params + 12 * size.p6_layers * size.p6_d_model * size.p6_seq_len
    peak = peak_flops(device)

    def mfu(rate):
        return f"{100 * rate * flops / peak:.1f} %" if peak else "n/a (no known peak for this device)"

    out(f"transformer d_model {size.p6_d_model} × {size.p6_layers} layers × {size.p6_heads} heads, vocab "
        f"{size.p6_vocab} (bytes + unused entries), {n_params / 1e6:.1f}M parameters; L = {size.p6_seq_len}, "
        f"batch {size.p6_batch}; {'bf16-mixed' if bf16 else 'fp32'}; compiled: {'yes' if compile else 'no'}; "
        f"objective masked_discrete; {size.p6_steps} timed steps after {size.p6_warmup} (each side)")
    out(f"diffuse.train run: {steps} steps in {wall:.1f} s wall (setup, compile, final validation and "
        f"checkpoint included)")
    out("")
    out("| loop | tokens/s | MFU |")
    out("|---|---|---|")
    out(f"| diffuse.train, default callbacks (device-synced timer) | {framework:,.0f} | {mfu(framework)} |")
    out(f"| diffuse.train, its Throughput callback (train/tokens_per_sec) | {callback_rate:,.0f} | {mfu(callback_rate)} |")
    out(f"| bare PyTorch loop, same module | {bare:,.0f} | {mfu(bare)} |")
    out("")
    ratio = framework / bare
    out(f"framework / bare loop: {ratio:.3f} (target ≥ 0.97: {'met' if ratio >= 0.97 else 'NOT met'})"
        + (f"; MFU target ≥ 40 %: {'met' if 100 * framework * flops / peak >= 40 else 'NOT met'}" if peak else ""))
    out(f"MFU counts {flops / 1e6:.0f} MFLOP per token (6·N + 12·layers·d·L); peak "
        + (f"{peak / 1e12:.0f} TFLOP/s bf16 dense" if peak else "unknown"))
    return {"framework": framework, "callback": callback_rate, "bare": bare, "ratio": ratio, "params": n_params}


# -- block diffusion: FlexAttention vs SDPA ------------------------------------------------------------
class StepTimer(L.Callback):
    """Each step's loss (kept on the device, read at the end: no sync per step) and steps/s over the steps
    after `start_step` (device-synced at both ends). `last` is the instance of the latest run."""

    last: StepTimer | None = None

    def __init__(self, start_step: int = 3):
        self.start_step, self.losses, self.t0 = start_step, [], None
        self.t1 = math.nan
        self.steps = 0

    def setup(self, trainer, pl_module, stage):
        StepTimer.last = self

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach().float().reshape(()))
        if trainer.global_step == self.start_step:
            sync(pl_module.device)
            self.t0 = time.perf_counter()
        elif trainer.global_step == trainer.max_steps and self.t0 is not None:
            sync(pl_module.device)
            self.t1, self.steps = time.perf_counter(), trainer.global_step - self.start_step

    def result(self) -> dict:
        losses = [float(x) for x in self.losses]
        return {"losses": losses, "steps_per_s": self.steps / (self.t1 - self.t0) if self.steps else math.nan}


def train_block(size, device, data: Path, work: Path, attention: str) -> dict:
    """A short block-diffusion (BD3LM) run through diffuse.run.fit.train_in with model.attention=`attention`:
    its per-step losses and steps/s. The same seed, data order and initial weights for every attention."""
    from omegaconf import open_dict

    from diffuse.run.fit import train_in

    gpu = device.type == "cuda"
    run = work / f"block-{attention}"
    overrides = [
        "data=text", f"data.path={data}", "tokenizer=byte", "objective=masked_discrete",
        f"objective.block_size={size.block_size}", f"model.attention={attention}",
        f"model.d_model={size.block_d_model}", f"model.n_layers={size.block_layers}",
        f"model.n_heads={size.block_heads}", f"data.seq_len={size.block_seq_len}",
        f"data.batch_size={size.block_batch}", f"data.eval_batch_size={size.block_batch}",
        f"trainer={'gpu' if gpu else 'default'}", f"trainer.accelerator={'gpu' if gpu else 'cpu'}",
        f"trainer.max_steps={size.block_steps}", "trainer.val_check_interval=1000000", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "callbacks.progress_bar=null",
        "num_samples=0", f"paths.cache_dir={work / 'cache'}",
    ]
    cfg = compose_train_config(overrides, run)
    with open_dict(cfg):
        cfg.callbacks["step_timer"] = {"_target_": "gpu_speed.StepTimer", "start_step": size.block_warmup}
    StepTimer.last = None
    wall = time.perf_counter()
    metrics = train_in(cfg, run)
    wall = time.perf_counter() - wall
    return {**StepTimer.last.result(), "wall": wall, "metrics": metrics, "overrides": overrides}


def block_mask_cases(size, device, out) -> list[str]:
    """Block-layout ([x_t ; x_0], BD3LM) forwards of a padded batch and of packed documents (cut at block
    boundaries) against each row / document alone, under SDPA (boolean mask) and FlexAttention (BlockMask);
    and flex against SDPA on the same batch. Returns the failed cases."""
    from diffuse.models.layers import BlockLayout
    from diffuse.models.transformer import Transformer

    L, b = size.mask_len, size.block_size
    gen = torch.Generator().manual_seed(0)
    xt = torch.randint(1, 96, (4, L), generator=gen)
    x0 = torch.randint(1, 96, (4, L), generator=gen)
    lengths = [L, L - 5, L // 2 + 1, 3]
    padded = torch.zeros(4, L, dtype=torch.long)
    for r, n in enumerate(lengths):
        padded[r, :n] = 1
    cut = (L // 2) // b * b or b  # documents start on a block boundary: alone, their blocks are the same
    docs = [(0, cut, 1), (cut, L - 4, 2)]
    packed = torch.zeros(4, L, dtype=torch.long)
    for a, e, s in docs:
        packed[:, a:e] = s
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
    models = {}
    for kind in ("sdpa", "flex"):
        torch.manual_seed(0)
        models[kind] = Transformer(vocab_size=100, d_model=size.mask_width, n_layers=2,
                                   n_heads=max(1, size.mask_width // 64), attention=kind).to(device).eval()
    out(f"block_size {b}, rows of {L} (the layout is 2×{L}: noisy then clean); width {size.mask_width}, 2 layers")
    out("")
    out("| attention | case | dtype | max abs diff / max abs | finite | ok |")
    out("|---|---|---|---|---|---|")
    failed, batch_out = [], {}

    def forward(model, ids_t, ids_0, seg, n):
        layout = BlockLayout.noisy_and_clean(n, b, device=device)
        ids = torch.cat([ids_t, ids_0], 1).to(device)
        return model(ids=ids, segment_ids=None if seg is None else seg.repeat(1, 2).to(device), layout=layout).float()

    for dtype in dtypes:
        for kind, model in models.items():
            for case, seg, spans in (("padded rows", padded, [[(0, n)] for n in lengths]),
                                     ("packed documents", packed, [[(a, e) for a, e, _ in docs]] * 4)):
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32):
                    whole = forward(model, xt, x0, seg, L)
                    batch_out[(kind, case, dtype)] = whole
                    worst = scale = 0.0
                    for r, row in enumerate(spans):
                        for a, e in row:
                            alone = forward(model, xt[r:r + 1, a:e], x0[r:r + 1, a:e], None, e - a)[0]
                            n = e - a
                            got = torch.cat([whole[r, a:e], whole[r, L + a:L + e]])  # its noisy and clean halves
                            worst = max(worst, (got - alone[: 2 * n]).abs().max().item())
                            scale = max(scale, alone.abs().max().item())
                rel, finite = worst / scale, bool(whole.isfinite().all())
                ok = rel <= tol[dtype] and finite
                failed += [] if ok else [f"{kind} {case} {dtype} vs alone"]
                out(f"| {kind} | {case} vs each alone | {str(dtype).split('.')[-1]} | {rel:.2e} | {finite} | "
                    f"{'ok' if ok else 'FAILED'} (tol {tol[dtype]:g}) |")
        for case in ("padded rows", "packed documents"):
            a, s = batch_out[("flex", case, dtype)], batch_out[("sdpa", case, dtype)]
            real = (padded if case == "padded rows" else packed).repeat(1, 2).to(device) > 0  # padding rows differ
            rel = (a - s)[real].abs().max().item() / s[real].abs().max().item()
            ok = rel <= tol[dtype]
            failed += [] if ok else [f"flex vs sdpa {case} {dtype}"]
            out(f"| flex vs sdpa | {case}, same batch | {str(dtype).split('.')[-1]} | {rel:.2e} | "
                f"{bool(a.isfinite().all())} | {'ok' if ok else 'FAILED'} (tol {tol[dtype]:g}) |")
    return failed


# -- AR: the static KV cache ---------------------------------------------------------------------------
class NoEOS(nn.Module):
    """A backbone whose logits never pick EOS (every row runs the full length, so tokens/s is batch × length
    over the time); `cached=False` hides `new_cache`, so the AR sampler re-runs the whole prefix each step."""

    def __init__(self, inner, eos: int, cached: bool = True):
        super().__init__()
        self.inner, self.eos = inner, eos
        self.time_conditioned = inner.time_conditioned
        for name in ("supports_block_layout", "vocab_size"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))
        if cached:
            self.new_cache = inner.new_cache

    def forward(self, **kw):
        return self.inner(**kw)

    def logits(self, hidden):
        out = self.inner.logits(hidden)
        out[..., self.eos] = float("-inf")
        return out


def special_tokens(vocab: int):
    from diffuse.objectives.base import SpecialTokens

    return SpecialTokens(pad=vocab - 4, bos=vocab - 3, eos=vocab - 2, mask=vocab - 1)


def random_transformer(size, device, seed: int = 0, **kw):
    from diffuse.models.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(size.ar_vocab, d_model=size.ar_d_model, n_layers=size.ar_layers, n_heads=size.ar_heads,
                       **kw).to(device).eval()


@torch.no_grad()
def cache_logits_gap(model, device, dtype, length: int, prefill: int) -> float:
    """max |cached − full| / max |full| over every position: a prefill of `prefill`, then one token per
    cached call, against one causal forward over the whole sequence (2 rows, the second left-padded)."""
    vocab = model.vocab_size
    x = torch.randint(0, vocab - 4, (2, length), generator=torch.Generator().manual_seed(1)).to(device)
    seg = torch.ones_like(x)
    seg[1, :3] = 0  # three left-padding positions in row 1, as the AR sampler pads prompts
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32):
        full = model.logits(model(ids=x, segment_ids=seg, causal=True)).float()
        cache = model.new_cache(max_length=length)
        parts = [model.logits(model(ids=x[:, :prefill], segment_ids=seg[:, :prefill], causal=True, cache=cache))]
        for j in range(prefill, length):
            parts.append(model.logits(model(ids=x[:, j:j + 1], segment_ids=seg[:, j:j + 1], causal=True, cache=cache)))
    cached = torch.cat(parts, 1).float()
    real = seg.bool()
    return ((cached - full)[real].abs().max() / full[real].abs().max()).item()


def run_kv_cache(size, device, out) -> dict:
    """AR sampling tokens/s with the static KV cache vs re-running the prefix, batch 1 and the large batch;
    and the cached logits against a full causal forward (fp32 1e-5, bf16 1e-3, relative to max |logit|)."""
    from diffuse.objectives.autoregressive import Autoregressive
    from diffuse.sampling.ar import ARSampler

    bf16 = device.type == "cuda"
    special = special_tokens(size.ar_vocab)
    objective = Autoregressive(special=special)
    model = random_transformer(size, device)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
    out(f"transformer d_model {size.ar_d_model} × {size.ar_layers} layers × {size.ar_heads} heads, vocab "
        f"{size.ar_vocab}, random weights; prompt {size.ar_prompt}, {size.ar_length} new tokens per row (EOS "
        f"forbidden); sampler=ar temperature 1; {'bf16 autocast' if bf16 else 'fp32'}; best of "
        f"{size.sample_reps} after a warm-up")
    out("")
    out("| check | dtype | max abs diff / max abs | ok |")
    out("|---|---|---|---|")
    failed = []
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 here (no TF32)
    try:
        for dtype in [torch.float32] + ([torch.bfloat16] if bf16 else []):
            gap = cache_logits_gap(model, device, dtype, min(64, size.ar_prompt + size.ar_length), size.ar_prompt)
            ok = gap <= tol[dtype]
            failed += [] if ok else [f"cached logits {dtype}"]
            out(f"| cached logits = full causal forward | {str(dtype).split('.')[-1]} | {gap:.2e} | "
                f"{'ok' if ok else 'FAILED'} (tol {tol[dtype]:g}) |")
    finally:
        torch.set_float32_matmul_precision(precision)
    sampler = ARSampler(temperature=1.0)
    rows = {}
    out("")
    out("| batch | static KV cache tokens/s | no cache (prefix re-run) tokens/s | cache / none | same tokens |")
    out("|---|---|---|---|---|")
    for batch in size.sample_batches:
        prompts = torch.randint(0, size.ar_vocab - 4, (batch, size.ar_prompt),
                                generator=torch.Generator().manual_seed(batch)).tolist()
        rates, tokens = {}, {}
        for cached in (True, False):
            backbone = NoEOS(model, special.eos, cached=cached)
            with autocast(device, bf16):
                sampler.generate(backbone, objective, prompts, min(size.ar_length, 8), seed=0)  # warm-up
                best = math.inf
                for _ in range(size.sample_reps):
                    sync(device)
                    t0 = time.perf_counter()
                    tokens[cached] = sampler.generate(backbone, objective, prompts, size.ar_length, seed=0).tokens
                    sync(device)
                    best = min(best, time.perf_counter() - t0)
            rates[cached] = batch * size.ar_length / best
        same = torch.equal(tokens[True], tokens[False])
        if not same and not bf16:
            failed.append(f"tokens differ with and without the cache at batch {batch} (fp32)")
        rows[batch] = rates
        out(f"| {batch} | {rates[True]:,.1f} | {rates[False]:,.1f} | {rates[True] / rates[False]:.2f}× | {same}"
            + ("" if same or not bf16 else " (bf16: kernels differ, not a failure)") + " |")
    return {"rows": rows, "failed": failed}


# -- sampling throughput: diffusion samplers vs AR with its KV cache ----------------------------------
# labels of experiments/bench/sampling.py's CONFIGS measured here (its "full" run = masked_discrete, no blocks)
SAMPLING_LABELS = ("AR + static KV cache", "full, llada 1 tok/step", "full, llada 1 tok/step + prefix cache",
                   "full, llada 1 tok/step + dual cache", "full, threshold 0.9 + dual cache",
                   "block 16, 1 tok/step, exact cache", "block 16, threshold 0.9, exact cache")


class TimedModule:
    """What sampling.timed_generate calls (`module.generate`): the sampler on a backbone, device-synced at the
    end so the time is the work's, under bf16 autocast on CUDA."""

    def __init__(self, backbone, objective, device, bf16: bool):
        self.backbone, self.objective, self.device, self.bf16 = backbone, objective, device, bf16

    def generate(self, prompts, length, seed=0, sampler=None):
        with autocast(self.device, self.bf16):
            result = sampler.generate(self.backbone, self.objective, prompts, length, seed=seed)
        sync(self.device)
        return result


def run_sampling(size, device, out) -> dict:
    """tokens/s of each sampler at batch 1 and the large batch, unconditional, random weights (EOS forbidden,
    so every row delivers `length` tokens; no quality here: experiments/bench/sampling.py pairs speed with it)."""
    import sampling as bench  # experiments/bench/sampling.py: its CONFIGS, spec_for and timed_generate

    from diffuse.objectives.autoregressive import Autoregressive
    from diffuse.objectives.masked_discrete import MaskedDiscrete
    from diffuse.registry import SAMPLERS
    from diffuse.run.build import build_sampler
    from diffuse.schedules import build_schedule

    bf16 = device.type == "cuda"
    special = special_tokens(size.ar_vocab)
    objectives = {"ar": Autoregressive(special=special),
                  "full": MaskedDiscrete(build_schedule("linear"), special),
                  "block16": MaskedDiscrete(build_schedule("linear"), special, block_size=16)}
    model = random_transformer(size, device)
    backbone = NoEOS(model, special.eos)
    configs = [c for c in bench.CONFIGS if c[0] in SAMPLING_LABELS]
    length = size.ar_length
    out(f"the transformer of the kv-cache section (random weights, EOS forbidden) for every sampler; "
        f"{length} tokens per row, unconditional; {'bf16 autocast' if bf16 else 'fp32'}; tokens/s = rows × "
        f"{length} / seconds (best of {size.sample_reps}, after a warm-up); samplers as experiments/bench/sampling.py "
        f"configures them (llada/threshold in blocks of 16)")
    out("")
    batches = size.sample_batches
    out("| sampler | spec | " + " | ".join(f"tokens/s batch {b}" for b in batches) + " | "
        + " | ".join(f"× AR batch {b}" for b in batches) + " |")
    out("|---" * (2 + 2 * len(batches)) + "|")
    rows, failed = {}, []
    for label, run, spec in configs:
        spec = bench.spec_for(spec, length)
        try:
            sampler = build_sampler(spec, objectives[run])
            module = TimedModule(backbone, objectives[run], device, bf16)
            bench.timed_generate(module, sampler, 1, 1, min(length, 16), 0)  # warm-up
            rates = {}
            for b in batches:
                best = min(bench.timed_generate(module, sampler, b, b, length, 0)[1] for _ in range(size.sample_reps))
                rates[b] = b * length / best
            rows[label] = rates
        except Exception as err:  # one sampler failing is reported, the others still run
            failed.append(label)
            out(f"| {label} | `{spec}` | FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''} |")
            continue
        ar = rows.get(SAMPLING_LABELS[0])
        out(f"| {label} | `{', '.join(f'{k}={v}' for k, v in spec.items())}` | "
            + " | ".join(f"{rates[b]:,.1f}" for b in batches) + " | "
            + " | ".join(f"{rates[b] / ar[b]:.2f}×" if ar else "n/a" for b in batches) + " |")
    hybrid = [n for n in SAMPLERS.names() if any(k in n for k in ("hybrid", "specul"))] \
        if hasattr(SAMPLERS, "names") else []
    out("")
    out("hybrid / speculative sampler: " + (f"registered ({', '.join(hybrid)}) but not measured by this script yet"
                                            if hybrid else "not yet in the tree"))
    return {"rows": rows, "failed": failed, "hybrid": hybrid}
