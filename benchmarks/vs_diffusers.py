"""minildm against diffusers: the same UNet and autoencoder built in both, timed side by side (issue 5, item 2).

minildm's modules carry diffusers' names (down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k, ...),
so for each case this benchmark builds diffusers' UNet2DConditionModel and AutoencoderKL from the matching
arguments (`diffusers_unet_kwargs`, `diffusers_autoencoder_kwargs`), loads minildm's state dict into them
(strictly: every tensor's name and shape must match), checks that both give the same outputs, and then
times them, alternating minildm and diffusers in one process after warm-up (the order turning each round):
the median of the repeats, and the ratio minildm / diffusers as the median over rounds of the ratio within
a round (two calls a moment apart feel the same load from other jobs):

    forward         one call under torch.no_grad()
    training step   forward, MSE loss, backward, AdamW step
    peak memory     of each, counted by torch's allocator (common.peak_memory)

Cases:
    small      the demo's scale: 8x8x4 latents, UNet channels (64, 128), cross-attention dim 128, batch 64;
               the f=4 autoencoder of the demo on 32x32 images
    sd_shaped  Stable Diffusion's layout at a quarter of its width: UNetConfig.sd_shaped() (4 levels, 2 ResNets
               each, attention at the first three), 16x16x4 latents, 77 text tokens of width 256, batch 8;
               SD's autoencoder (128, 256, 512, 512) / 4 on 128x128 images, f = 8, batch 2

One known difference: diffusers' encoder pads (0, 1, 0, 1) before each stride-2 convolution, as the original
SD code did, where minildm pads 1 on every side. The weights and the cost are the same; the check shows that
with diffusers' padding set to minildm's the encoders agree too. The timings use diffusers as it comes.

Then minildm's own speed options, each timed against the default (they are measured, not assumed):
channels_last memory format, attention written out (softmax(QK^T/sqrt(d)) V, which `store_attention_probs`
switches on) instead of scaled_dot_product_attention, and torch.compile, with its compile time.

    pip install "minildm[bench]"   # diffusers (measured with 0.42.1)
    python -m benchmarks.vs_diffusers [--quick] [--threads 1] [--device cuda] [--no-compile]
    python -m benchmarks.vs_diffusers --forward-only sd_shaped --repeats 41 --threads 1   # a ratio near 1.0 again
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minildm.attention import Attention
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.unet import UNet2DConditionModel, UNetConfig

from .common import (
    add_device_arguments,
    autocast,
    git_commit,
    interleaved_samples,
    machine,
    paired_ratios,
    peak_memory,
    setup_device,
    write_result,
)


@dataclass
class Case:
    unet: UNetConfig
    latent_size: int
    batch_size: int
    text_length: int
    autoencoder: AutoencoderConfig
    image_size: int
    ae_batch_size: int


CASES = {
    "small": Case(UNetConfig.tiny(), latent_size=8, batch_size=64, text_length=16,
                  autoencoder=AutoencoderConfig(3, 4, (16, 32, 64), norm_num_groups=8), image_size=32,
                  ae_batch_size=64),
    "sd_shaped": Case(UNetConfig.sd_shaped(), latent_size=16, batch_size=8, text_length=77,
                      autoencoder=AutoencoderConfig(3, 4, (32, 64, 128, 128), layers_per_block=2, norm_num_groups=32),
                      image_size=128, ae_batch_size=2),
}


def diffusers_unet_kwargs(config: UNetConfig, sample_size: int) -> dict:
    """diffusers.UNet2DConditionModel's arguments for the network `config` describes."""
    if config.cross_attention_dim is None:
        raise ValueError("diffusers' UNet2DConditionModel always has cross-attention: "
                         "compare a text-conditioned UNetConfig (cross_attention_dim set)")
    return dict(
        sample_size=sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels)),
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim,
        # diffusers' `attention_head_dim` is, for historical reasons, the number of heads at each level.
        attention_head_dim=tuple(ch // config.attention_head_dim for ch in config.block_out_channels),
        transformer_layers_per_block=config.transformer_layers_per_block,
        norm_num_groups=config.norm_num_groups, norm_eps=1e-6,  # every GroupNorm in minildm uses eps 1e-6
        dropout=config.dropout,
        use_linear_projection=True,  # minildm's proj_in / proj_out are Linear layers (SD 2), not 1x1 convolutions
    )


def diffusers_autoencoder_kwargs(config: AutoencoderConfig, sample_size: int) -> dict:
    """diffusers.AutoencoderKL's arguments for the network `config` describes."""
    levels = len(config.block_out_channels)
    return dict(
        in_channels=config.in_channels, out_channels=config.in_channels, latent_channels=config.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups, sample_size=sample_size, scaling_factor=config.scaling_factor,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_same(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Max |ours - theirs|; raises if it is more than float rounding could explain."""
    difference = (ours - theirs).abs().max().item()
    if difference > 1e-3 * (1.0 + theirs.abs().max().item()):
        raise RuntimeError(f"{name}: minildm and diffusers disagree by up to {difference:.3g} with the same weights")
    return difference


@contextlib.contextmanager
def exact_float32():
    """TF32 off while outputs are compared. On an NVIDIA GPU, convolutions run in TF32 (a 10-bit mantissa) by
    default, and two implementations of one network may get different kernels: the SD-shaped decoders differed
    by 0.0056 on an H200, which says nothing about whether the networks are the same. Timings keep the defaults."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def load_across(ours, theirs, device: torch.device):
    """Give diffusers' model minildm's weights (strictly: every name and shape must match) and check that the
    parameter counts agree; both models moved to `device`."""
    theirs.load_state_dict(ours.state_dict())
    if count_parameters(ours) != count_parameters(theirs):
        raise RuntimeError(f"parameter counts differ: {count_parameters(ours):,} vs {count_parameters(theirs):,}")
    return ours.to(device), theirs.to(device)


def build_unets(case: Case, device: torch.device):
    """(minildm UNet, diffusers UNet with minildm's weights, inputs, check dict)."""
    import diffusers

    ours = UNet2DConditionModel(case.unet)
    theirs = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(case.unet, case.latent_size))
    ours, theirs = load_across(ours, theirs, device)
    generator = torch.Generator().manual_seed(0)
    B, c, h = case.batch_size, case.unet.in_channels, case.latent_size
    inputs = (torch.randn(B, c, h, h, generator=generator).to(device),  # sample (B, c, h, w)
              torch.randint(0, 1000, (B,), generator=generator).to(device),  # timestep (B,)
              torch.randn(B, case.text_length, case.unet.cross_attention_dim, generator=generator).to(device))
    with torch.no_grad(), exact_float32():
        difference = check_same("UNet", ours(*inputs), theirs(*inputs).sample)
    return ours, theirs, inputs, {"parameters": count_parameters(ours), "max_abs_difference": difference}


def build_autoencoders(case: Case, device: torch.device):
    """(minildm AutoencoderKL, diffusers AutoencoderKL with minildm's weights, inputs, check dict)."""
    import diffusers

    ours = AutoencoderKL(case.autoencoder)
    theirs = diffusers.AutoencoderKL(**diffusers_autoencoder_kwargs(case.autoencoder, case.image_size))
    ours, theirs = load_across(ours, theirs, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(case.ae_batch_size, 3, case.image_size, case.image_size, generator=generator) * 2 - 1
    images = images.to(device)  # (B, 3, H, W) in [-1, 1]
    f = case.autoencoder.downsampling_factor
    latents = torch.randn(len(images), case.autoencoder.latent_channels, case.image_size // f, case.image_size // f,
                          generator=generator).to(device)
    padded_like_minildm = copy.deepcopy(theirs)
    for block in padded_like_minildm.encoder.down_blocks:
        for downsampler in block.downsamplers or []:
            downsampler.padding, downsampler.conv.padding = 1, (1, 1)  # no (0, 1, 0, 1) pad, conv pads 1 instead
    with torch.no_grad(), exact_float32():
        checks = {
            "parameters": count_parameters(ours),
            "decoder_max_abs_difference": check_same("decoder", ours.decode(latents), theirs.decode(latents).sample),
            "encoder_max_abs_difference_with_minildm_padding": check_same(
                "encoder", ours.encode(images).mean, padded_like_minildm.encode(images).latent_dist.mean),
            "encoder_max_abs_difference_as_shipped": (ours.encode(images).mean
                                                      - theirs.encode(images).latent_dist.mean).abs().max().item(),
        }
    return ours, theirs, (images,), checks


def forward_fn(call, device):
    def forward():
        with torch.no_grad(), autocast(device):
            call()
    return forward


def training_step_fn(model, call, target, device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast(device):
            loss = F.mse_loss(call().float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def compare(calls: dict, models: dict, target: torch.Tensor, repeats: int, device, baseline: str) -> dict:
    """Forward and training-step medians and peak memory of each named call, timed alternately, and the ratio
    of each to the baseline's (for times, the median of the ratios within a round: common.paired_ratios)."""
    forwards = {name: forward_fn(call, device) for name, call in calls.items()}
    steps = {name: training_step_fn(models[name], call, target, device) for name, call in calls.items()}
    warmup = 1 if repeats < 3 else 2
    result, ratio = {}, {}
    for metric, functions in (("forward", forwards), ("train_step", steps)):
        samples = interleaved_samples(functions, repeats, warmup)
        result[f"{metric}_s"] = {name: statistics.median(values) for name, values in samples.items()}
        ratio[f"{metric}_s"] = paired_ratios(samples, baseline)
    for metric, functions in (("forward", forwards), ("train_step", steps)):
        peaks = {name: peak_memory(fn, device) / 2**20 for name, fn in functions.items()}
        result[f"{metric}_peak_mb"] = peaks
        ratio[f"{metric}_peak_mb"] = {name: peak / peaks[baseline] for name, peak in peaks.items() if name != baseline}
    return {**result, "ratio": ratio}


def set_written_out_attention(model: torch.nn.Module, on: bool) -> None:
    """softmax(QK^T/sqrt(d)) V as three explicit operations (store_attention_probs) instead of the fused kernel."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.store_attention_probs = on


def minildm_options(unet, inputs, autoencoder, images, repeats: int, device, compile_unet: bool) -> dict:
    """minildm's default against channels_last, written-out attention and torch.compile, alternately."""
    channels_last = torch.channels_last
    unet_cl = copy.deepcopy(unet).to(memory_format=channels_last)
    inputs_cl = (inputs[0].to(memory_format=channels_last), *inputs[1:])
    written_out = copy.deepcopy(unet)
    set_written_out_attention(written_out, True)
    unet_variants = {"default": unet, "channels_last": unet_cl, "written_out_attention": written_out}
    calls = {"default": lambda: unet(*inputs), "channels_last": lambda: unet_cl(*inputs_cl),
             "written_out_attention": lambda: written_out(*inputs)}
    result = {}
    if compile_unet:
        compiled = torch.compile(copy.deepcopy(unet))
        start = time.perf_counter()
        forward_fn(lambda: compiled(*inputs), device)()
        compile_forward_s = time.perf_counter() - start
        start = time.perf_counter()
        training_step_fn(compiled, lambda: compiled(*inputs), inputs[0], device)()
        result["compile_time_s"] = {"forward": compile_forward_s, "training_step": time.perf_counter() - start}
        unet_variants["compiled"], calls["compiled"] = compiled, lambda: compiled(*inputs)
    result["unet"] = compare(calls, unet_variants, inputs[0], repeats, device, baseline="default")

    autoencoder_cl = copy.deepcopy(autoencoder).to(memory_format=channels_last)
    images_cl = images.to(memory_format=channels_last)
    result["autoencoder"] = compare(
        {"default": lambda: autoencoder(images), "channels_last": lambda: autoencoder_cl(images_cl)},
        {"default": autoencoder, "channels_last": autoencoder_cl}, images, repeats, device, baseline="default")
    return result


def run_case(case: Case, repeats: int, device, compile_unet: bool) -> dict:
    unet, d_unet, unet_inputs, unet_checks = build_unets(case, device)
    unet_result = compare({"minildm": lambda: unet(*unet_inputs), "diffusers": lambda: d_unet(*unet_inputs).sample},
                          {"minildm": unet, "diffusers": d_unet}, unet_inputs[0], repeats, device, baseline="diffusers")
    ae, d_ae, (images,), ae_checks = build_autoencoders(case, device)
    ae_result = compare({"minildm": lambda: ae(images), "diffusers": lambda: d_ae(images).sample},
                        {"minildm": ae, "diffusers": d_ae}, images, repeats, device, baseline="diffusers")
    return {
        "config": {"unet": dataclasses.asdict(case.unet), "latent_size": case.latent_size,
                   "batch_size": case.batch_size, "text_length": case.text_length,
                   "autoencoder": dataclasses.asdict(case.autoencoder), "image_size": case.image_size,
                   "ae_batch_size": case.ae_batch_size},
        "unet": {**unet_checks, **unet_result},
        "autoencoder": {**ae_checks, **ae_result},
        "minildm_options": minildm_options(unet, unet_inputs, ae, images, repeats, device, compile_unet),
    }


def print_case(name: str, result: dict) -> None:
    print(f"\n{name}: UNet {result['unet']['parameters']:,} parameters, autoencoder "
          f"{result['autoencoder']['parameters']:,} (identical in both; outputs agree to "
          f"{max(result['unet']['max_abs_difference'], result['autoencoder']['decoder_max_abs_difference']):.1e})")
    print(f"{'':28}{'minildm':>10}{'diffusers':>11}{'ratio':>8}")
    metrics = {"forward_s": ("forward", "ms", 1e3), "train_step_s": ("training step", "ms", 1e3),
               "forward_peak_mb": ("forward peak", "MB", 1), "train_step_peak_mb": ("training peak", "MB", 1)}
    for model in ("unet", "autoencoder"):
        r = result[model]
        for metric, (name, unit, scale) in metrics.items():
            label = f"{model} {name}"
            print(f"{label:28}{r[metric]['minildm'] * scale:>8.1f}{unit}{r[metric]['diffusers'] * scale:>9.1f}{unit}"
                  f"{r['ratio'][metric]['minildm']:>8.2f}")
    options = result["minildm_options"]
    for model in ("unet", "autoencoder"):
        for variant, values in options[model]["ratio"]["forward_s"].items():
            print(f"  minildm {model} {variant}: forward x{values:.2f}, training step "
                  f"x{options[model]['ratio']['train_step_s'][variant]:.2f} of the default's time")
    if "compile_time_s" in options:
        print(f"  torch.compile took {options['compile_time_s']['forward']:.0f} s (forward) + "
              f"{options['compile_time_s']['training_step']:.0f} s (training step) before the first call returned")


def recheck_forwards(case: Case, repeats: int, device) -> dict:
    """Only the forwards of one case, for many rounds: the ratio's median with its quartiles, to tell a ratio
    near 1.0 from noise (`--forward-only`)."""
    unet, d_unet, unet_inputs, _ = build_unets(case, device)
    ae, d_ae, (images,), _ = build_autoencoders(case, device)
    result = {}
    for model, ours, theirs in (("unet", lambda: unet(*unet_inputs), lambda: d_unet(*unet_inputs).sample),
                                ("autoencoder", lambda: ae(images), lambda: d_ae(images).sample)):
        samples = interleaved_samples({"minildm": forward_fn(ours, device), "diffusers": forward_fn(theirs, device)},
                                      repeats)
        ratios = [a / b for a, b in zip(samples["minildm"], samples["diffusers"])]
        result[model] = {"forward_s": {name: statistics.median(v) for name, v in samples.items()},
                         "ratio_median": statistics.median(ratios),
                         "ratio_quartiles": statistics.quantiles(ratios, n=4)}
        print(f"{model} forward: minildm / diffusers {result[model]['ratio_median']:.3f} (quartiles "
              f"{result[model]['ratio_quartiles'][0]:.3f} to {result[model]['ratio_quartiles'][2]:.3f}, "
              f"{repeats} rounds)", flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats: checks that it runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 15, 1 with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of compiling on a CPU)")
    parser.add_argument("--forward-only", metavar="CASE", choices=sorted(CASES), default=None,
                        help="time only this case's two forwards, with quartiles (use many --repeats)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    try:
        import diffusers
    except ImportError:
        message = 'diffusers is not installed: pip install "minildm[bench]" (or pip install diffusers) to compare'
        print(f"skipped: {message}")
        return {"skipped": message}
    device = setup_device(args)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 15)
    compile_unet = not (args.quick or args.no_compile)
    cases = CASES
    if args.quick:  # the same networks on small inputs
        cases = {"small": dataclasses.replace(CASES["small"], batch_size=4, ae_batch_size=2),
                 "sd_shaped": dataclasses.replace(CASES["sd_shaped"], latent_size=8, batch_size=1, image_size=32,
                                                  ae_batch_size=1)}
    torch.manual_seed(0)
    result = {"diffusers": diffusers.__version__, "device": str(device), "repeats": repeats, "machine": machine(),
              "git": git_commit(),
              "cases": {}}
    if args.forward_only is not None:
        result["cases"][args.forward_only] = recheck_forwards(cases[args.forward_only], repeats, device)
        if not args.quick:
            print(f"wrote {write_result(f'vs_diffusers_forward_{args.forward_only}', result, device)}")
        return result
    for name, case in cases.items():
        result["cases"][name] = run_case(case, repeats, device, compile_unet and name == "small")
        print_case(name, result["cases"][name])
    all_ratios = [r[model]["ratio"][metric]["minildm"] for r in result["cases"].values()
                  for model in ("unet", "autoencoder") for metric in ("forward_s", "train_step_s")]
    result["median_time_ratio"] = statistics.median(all_ratios)
    print(f"\nminildm / diffusers time, median over cases, models and forward/training: "
          f"{result['median_time_ratio']:.2f} (target <= 1.0); worst {max(all_ratios):.2f}")
    if not args.quick:
        print(f"wrote {write_result('vs_diffusers', result, device)}")
    return result


if __name__ == "__main__":
    main()
