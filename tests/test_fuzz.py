"""Fuzz the public API with hypothesis: random shapes, dtypes, devices, values (NaN, inf, huge), prompts
(empty, whitespace, unicode, very long, unknown words), step counts, guidance scales and file paths.

Each example draws every argument from a strategy of good values (which still hold NaN, inf, huge
numbers, odd prompts), then, most of the time, replaces one argument with a bad one: a wrong type, shape,
dtype, device or range. Every call either works or raises ValueError, TypeError or FileNotFoundError
whose message names an argument of the call (as a word) or, for a file, the path it was given. Any other
exception (a RuntimeError or IndexError from deep inside torch, an AttributeError) fails the test, and
so does a call that takes longer than HANG_SECONDS.

The examples are derandomized (the same inputs on every run) and bounded so that the file runs in well
under a minute on one core; `pytest -s tests/test_fuzz.py` prints how many calls it made. "meta" tensors
stand in for tensors on another device (a GPU), the mistake a CPU-only machine can still make.
"""

import json
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_ldm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minildm import (
    AutoencoderKL,
    DDIMSampler,
    DDPMSampler,
    LatentDiffusion,
    NoiseSchedule,
    Tokenizer,
    UNet2DConditionModel,
    UNetConfig,
    load_mnist,
)
from minildm.checkpoint import load_weights, save_weights

HANG_SECONDS = 20
CALLS: Counter = Counter()  # (test, outcome) -> calls, printed at the end of the module


def fuzz(max_examples):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _hang(signum, frame):
    raise TimeoutError(f"the call ran longer than {HANG_SECONDS} s")


def check(call, *names, must_work=False):
    """Run call(): it may return, or raise ValueError/TypeError/FileNotFoundError naming one of `names`;
    with must_work (all its arguments were good), it must return."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(HANG_SECONDS)
    try:
        result = call()
        CALLS[test, "worked"] += 1
        return result
    except (ValueError, TypeError, FileNotFoundError) as e:
        CALLS[test, "refused"] += 1
        message = str(e)
        assert not must_work, f"good arguments were refused: {type(e).__name__}({message!r})"
        assert any(re.search(rf"(?<![\w.]){re.escape(str(name))}(?!\w)", message) for name in names), (
            f"{type(e).__name__}({message!r}) names none of {names}")
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", autouse=True)
def report_calls():
    start = time.perf_counter()
    yield
    print(f"\nfuzz: {sum(CALLS.values())} calls in {time.perf_counter() - start:.1f} s")
    for test in dict.fromkeys(test for test, _ in CALLS):
        print(f"  {test}: {CALLS[test, 'worked']} worked, {CALLS[test, 'refused']} refused")


# ---- strategies ----------------------------------------------------------------------------------------------

junk = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=8),
                 st.lists(st.integers(-3, 3), max_size=3), st.just(object()), st.just(b"bytes"))
numbers = st.one_of(st.integers(-(10**30), 10**30), st.floats(), st.sampled_from([0, 1, -1, 1e-300, 1e300]))
BAD_DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.complex64]
FILLS = ["normal"] * 5 + ["nan", "inf", "-inf", "huge", "zeros"]  # values a good tensor may still hold


class Arguments(dict):
    """Keyword arguments, and `bad`: the name of the one drawn from its bad strategy (None if all are good)."""

    bad = None


@st.composite
def arguments(draw, **specs):
    """Every value drawn from its good strategy, except, in about half the examples, one from its bad one.
    specs: name -> (good, bad)."""
    args = Arguments()
    args.bad = draw(st.sampled_from([*specs, *[None] * len(specs)]))
    args.update({name: draw(bad if name == args.bad else good) for name, (good, bad) in specs.items()})
    return args


@st.composite
def tensors(draw, shape, dtype=torch.float32, device="cpu"):
    """A tensor of `shape` (a tuple) with random values, some NaN, inf or huge."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    fill = draw(st.sampled_from(FILLS))
    if fill in ("nan", "inf", "-inf"):
        x.view(-1)[:1] = float(fill)  # the first element, if any
    elif fill == "huge":
        x = x * 1e30
    elif fill == "zeros":
        x = torch.zeros(shape)
    return x.to(dtype).to(device)


def bad_tensors(shape):
    """Wrong for `shape` (a tuple): another shape, an empty batch, another dtype or device, or not a tensor."""
    other_shapes = st.one_of(st.lists(st.integers(0, 6), max_size=5).map(tuple), st.just((0, *shape[1:])),
                             st.just(shape[1:]), st.just((*shape, 1)), st.just((shape[0], shape[1] + 1, *shape[2:])))
    return st.one_of(other_shapes.flatmap(tensors), st.sampled_from(BAD_DTYPES).flatmap(lambda d: tensors(shape, d)),
                     tensors(shape, device="meta"), junk)


prompts = st.one_of(
    st.sampled_from(["", " ", "\t\n ", "a red circle", "top left: a green triangle", "A LARGE RED CIRCLE!!",
                     "zebra quokka unknown words", "ÜNÏCÖDÉ ✓ 🙂 円", "a " * 500, "x" * 5000, "\x00\x01"]),
    st.text(max_size=40),
)
prompt_lists = st.one_of(prompts, st.lists(prompts, min_size=1, max_size=3))
bad_prompt_lists = st.one_of(junk, st.just([]), st.lists(st.one_of(prompts, junk), min_size=1, max_size=2).filter(
    lambda ps: not all(isinstance(p, str) for p in ps)))
generators = st.one_of(st.none(), st.integers(0, 9).map(lambda seed: torch.Generator().manual_seed(seed)))
paths = st.one_of(
    st.sampled_from(["", ".", "/", "missing", "missing/deeper/file.safetensors", "a\x00b", "x" * 300,
                     "/".join(["d"] * 2000), "ÜNÏCÖDÉ 🙂", "~", "..", "/dev/null", "/proc/self/status"]),
    st.text(max_size=20),
    junk,
)

LDM = make_tiny_ldm()  # built once: f = 4, 16x16 images, 4x4x4 latents, a 2-level UNet
PIXEL_UNET_CONFIG = UNetConfig(in_channels=3, out_channels=3, block_out_channels=(16, 16),
                               attention_levels=(False, True), cross_attention_dim=16, attention_head_dim=8,
                               norm_num_groups=4)
PIXEL_LDM = LatentDiffusion(None, UNet2DConditionModel(PIXEL_UNET_CONFIG), LDM.schedule, LDM.conditioner,
                            image_size=16).eval()  # the same, on pixels
SCHEDULE = NoiseSchedule()


# ---- schedule and samplers -----------------------------------------------------------------------------------


@fuzz(400)
@given(args=arguments(
    beta_schedule=(st.sampled_from(["linear", "scaled_linear", "cosine"]),
                   st.one_of(st.sampled_from(["LINEAR", "", "squaredcos_cap_v2"]), junk)),
    num_train_timesteps=(st.integers(1, 2000), st.one_of(st.integers(-2, 0), st.just(10**12), numbers, junk)),
    beta_start=(st.floats(1e-5, 1e-3), st.one_of(numbers, junk)),
    beta_end=(st.floats(1e-3, 0.05), st.one_of(numbers, junk))))
def test_noise_schedule(args):
    schedule = check(lambda: NoiseSchedule(**args), *args, must_work=args.bad is None)
    if schedule is not None:
        assert torch.isfinite(schedule.alphas_cumprod).all() and (schedule.alphas_cumprod > 0).all()


METHODS = {"add_noise": ("original_samples", "noise"), "get_velocity": ("sample", "noise"),
           "predict_x0_from_eps": ("x_t", "eps"), "predict_eps_from_x0": ("x_t", "x0"),
           "predict_x0_from_v": ("x_t", "v"), "predict_eps_from_v": ("x_t", "v"),
           "to_x0_and_eps": ("x_t", "model_output")}
SHAPE = (2, 3, 4, 4)


@fuzz(500)
@given(method=st.sampled_from(sorted(METHODS)), prediction_type=st.sampled_from(["epsilon", "v_prediction", "sample"]),
       args=arguments(
           first=(st.sampled_from([torch.float32, torch.float64]).flatmap(lambda d: tensors(SHAPE, d)),
                  bad_tensors(SHAPE)),
           second=(tensors(SHAPE), bad_tensors(SHAPE)),
           timesteps=(st.one_of(st.integers(0, 999), st.integers(0, 999).map(lambda t: torch.tensor([t, 999 - t]))),
                      st.one_of(st.integers(-5, -1), st.integers(1000, 10**30), st.floats(), junk,
                                st.just(torch.tensor([1.5, 2.0])), st.just(torch.tensor([True, False])),
                                st.just(torch.tensor([1, 2, 3])), st.just(torch.zeros(2, 2, dtype=torch.long))))))
def test_schedule_methods(method, prediction_type, args):
    first_name, second_name = METHODS[method]
    names = (first_name, second_name, "timesteps", "prediction_type")
    if method == "to_x0_and_eps":
        check(lambda: SCHEDULE.to_x0_and_eps(args["second"], args["first"], args["timesteps"], prediction_type),
              *names, must_work=args.bad is None)
    else:
        check(lambda: getattr(SCHEDULE, method)(args["first"], args["second"], args["timesteps"]), *names,
              must_work=args.bad is None)
    check(lambda: SCHEDULE.snr(args["timesteps"]), "timesteps", must_work=args.bad != "timesteps")


@fuzz(300)
@given(ddim=st.booleans(), args=arguments(
    schedule=(st.just(SCHEDULE), junk),
    eta=(st.floats(0, 1), st.one_of(st.floats(1.0001, 1e300), st.floats(-1e300, -1e-9), numbers, junk)),
    timestep_spacing=(st.sampled_from(["leading", "trailing", "linspace"]), st.one_of(st.just("Leading"), junk)),
    steps_offset=(st.integers(0, 5), st.one_of(st.integers(-3, -1), st.floats(), junk)),
    set_alpha_to_one=(st.booleans(), junk), prediction_type=(st.sampled_from(["epsilon", "v_prediction", "sample"]),
                                                           st.one_of(st.just("v"), junk)),
    clip_sample=(st.booleans(), junk)))
def test_sampler_constructors(ddim, args):
    if ddim:
        check(lambda: DDIMSampler(**args), *args, must_work=args.bad is None)
    else:
        ddpm_args = {name: value for name, value in args.items() if name not in ("eta", "set_alpha_to_one")}
        check(lambda: DDPMSampler(**ddpm_args), *ddpm_args, must_work=args.bad in (None, "eta", "set_alpha_to_one"))


@fuzz(400)
@given(ddim=st.booleans(), spacing=st.sampled_from(["leading", "trailing", "linspace"]), args=arguments(
    num_inference_steps=(st.integers(1, 999), st.one_of(st.integers(-3, 0), st.integers(1001, 10**30),
                                                        st.sampled_from([2.0, 50.5, True]), junk)),
    device=(st.sampled_from(["cpu", None, torch.device("cpu")]),
            st.one_of(st.sampled_from(["cuda:7", "nonsense", "cpu:-1", "", "meta"]), junk))))
def test_set_timesteps(ddim, spacing, args):
    sampler = (DDIMSampler if ddim else DDPMSampler)(SCHEDULE, timestep_spacing=spacing)
    done = check(lambda: sampler.set_timesteps(**args) or "done", *args, "steps_offset", must_work=args.bad is None)
    if done:
        assert len(sampler.timesteps) == args["num_inference_steps"]
        assert sampler.timesteps.max() < 1000 and (sampler.timesteps.diff() < 0).all()


LATENTS = (2, 4, 4, 4)


@fuzz(500)
@given(ddim=st.booleans(), eta=st.sampled_from([0.0, 1.0]), steps=st.integers(1, 20),
       prediction_type=st.sampled_from(["epsilon", "v_prediction", "sample"]), args=arguments(
           model_output=(tensors(LATENTS), bad_tensors(LATENTS)), sample=(tensors(LATENTS), bad_tensors(LATENTS)),
           timestep=(st.sampled_from(["first", "last", "tensor"]),
                     st.one_of(st.integers(-1, 1001), st.floats(), junk, st.just(torch.tensor([1, 2])),
                               st.just(torch.tensor(1.0)))),
           generator=(generators, junk)))
def test_sampler_step(ddim, eta, steps, prediction_type, args):
    sampler = (DDIMSampler(SCHEDULE, eta=eta, prediction_type=prediction_type) if ddim else
               DDPMSampler(SCHEDULE, prediction_type=prediction_type))
    sampler.set_timesteps(steps)
    timestep = {"first": int(sampler.timesteps[0]), "last": int(sampler.timesteps[-1]),
                "tensor": sampler.timesteps[0]}.get(args["timestep"], args["timestep"]) \
        if isinstance(args["timestep"], str) else args["timestep"]
    out = check(lambda: sampler.step(args["model_output"], timestep, args["sample"], args["generator"]), *args,
                must_work=args.bad is None)
    if out is not None:
        assert out.prev_sample.shape == args["sample"].shape


# ---- networks -----------------------------------------------------------------------------------------------


@st.composite
def unet_arguments(draw):
    """sample (B, 4, H, W), timestep and encoder_hidden_states (B, L, 16) that fit together, then maybe one bad."""
    B, H, W, L = draw(st.integers(1, 3)), draw(st.sampled_from([2, 4, 8])), draw(st.sampled_from([2, 4])), \
        draw(st.integers(1, 5))
    timesteps = st.one_of(st.integers(0, 999), st.floats(-1e30, 1e30), st.just(float("nan")),
                          st.sampled_from([(B,), (), (1,), (B, 1)]).map(lambda shape: torch.randint(0, 1000, shape)),
                          tensors((B,)))
    return draw(arguments(
        sample=(tensors((B, 4, H, W)), bad_tensors((B, 4, H, W))),
        timestep=(timesteps, st.one_of(st.just(10**30), junk.filter(lambda v: not isinstance(v, (int, float))),
                                       st.just(torch.zeros(B + 1)), st.just(torch.zeros(B, 2)),
                                       st.just(torch.tensor([True] * B)))),
        encoder_hidden_states=(tensors((B, L, 16)), st.one_of(bad_tensors((B, L, 16)), st.none()))))


@fuzz(300)
@given(args=unet_arguments())
def test_unet_forward(args):
    with torch.no_grad():
        out = check(lambda: LDM.backbone(**args), *args, must_work=args.bad is None)
    if out is not None:
        assert out.shape == args["sample"].shape


@fuzz(300)
@given(data=st.data(), B=st.integers(1, 2), H=st.sampled_from([4, 8]), W=st.sampled_from([4, 8]))
def test_autoencoder(data, B, H, W):
    autoencoder = LDM.first_stage  # f = 4
    args = data.draw(arguments(x=(tensors((B, 3, H, W)), st.one_of(bad_tensors((B, 3, H, W)),
                                                                   tensors((B, 3, H + 2, W)))),
                               z=(tensors((B, 4, H // 4, W // 4)), bad_tensors((B, 4, H // 4, W // 4)))))
    with torch.no_grad():
        posterior = check(lambda: autoencoder.encode(args["x"]), "x", must_work=args.bad != "x")
        if posterior is not None:
            assert posterior.sample(torch.Generator().manual_seed(0)).shape == (B, 4, H // 4, W // 4)
        images = check(lambda: autoencoder.decode(args["z"]), "z", must_work=args.bad != "z")
        if images is not None:
            assert images.shape == (B, 3, H // 4 * 4, W // 4 * 4)
        check(lambda: autoencoder(args["x"]), "x", must_work=args.bad != "x")


@fuzz(500)
@given(args=arguments(prompts=(prompt_lists, bad_prompt_lists)))
def test_tokenizer_and_text_encoder(args):
    tokenizer, prompts = LDM.conditioner.tokenizer, args["prompts"]
    ids = check(lambda: tokenizer(prompts), "texts", "prompts", must_work=args.bad is None)
    if ids is not None:
        assert ids.dtype == torch.long and ids.shape[1] == tokenizer.max_length
        assert ((ids >= 0) & (ids < len(tokenizer))).all()
    with torch.no_grad():
        states = check(lambda: LDM.conditioner.encode(prompts), "prompts", must_work=args.bad is None)
    if states is not None:
        assert torch.isfinite(states).all() and states.shape[0] == (1 if isinstance(prompts, str) else len(prompts))


VOCAB_SIZE, MAX_LENGTH = LDM.conditioner.config.vocab_size, LDM.conditioner.config.max_length


@fuzz(300)
@given(B=st.integers(1, 3), args=st.data())
def test_text_encoder_forward_and_tokenizer_constructor(B, args):
    ids = args.draw(arguments(input_ids=(
        st.integers(0, 2**16).map(lambda seed: torch.randint(0, VOCAB_SIZE, (B, MAX_LENGTH),
                                                             generator=torch.Generator().manual_seed(seed))),
        st.one_of(bad_tensors((B, MAX_LENGTH)), st.sampled_from([-1, VOCAB_SIZE, 10**9]).map(
            lambda v: torch.full((B, MAX_LENGTH), v)), st.just(torch.zeros(B, MAX_LENGTH, dtype=torch.int32))))))
    with torch.no_grad():
        check(lambda: LDM.conditioner(**ids), "input_ids", must_work=ids.bad is None)
    tokenizer_args = args.draw(arguments(
        vocab=(st.lists(st.text(min_size=1, max_size=4), max_size=6, unique=True).map(
            lambda words: ["<pad>", "<unk>", "<bos>", "<eos>", *[w for w in words if not w.startswith("<")]]),
               st.one_of(junk, st.lists(st.one_of(st.text(max_size=3), junk), max_size=4), st.just(["a", "a"]))),
        max_length=(st.integers(3, 40), st.one_of(st.integers(-2, 2), junk))))
    tokenizer = check(lambda: Tokenizer(**tokenizer_args), *tokenizer_args, must_work=tokenizer_args.bad is None)
    if tokenizer is not None:
        assert tokenizer("a b").shape == (1, tokenizer_args["max_length"])


# ---- the latent diffusion model -----------------------------------------------------------------------------


# Samplers for LDM and PIXEL_LDM (the same schedule and prediction type): generate()'s default (None), the ones
# make_sampler builds, and the samplers' own defaults.
samplers = st.one_of(
    st.none(), st.sampled_from([0.0, 0.5, 1.0]).map(lambda eta: LDM.make_sampler("ddim", eta=eta)),
    st.just("ddpm").map(LDM.make_sampler), st.sampled_from([DDIMSampler, DDPMSampler]).map(lambda cls: cls(SCHEDULE)))
# Not a sampler for these models: a name (generate() takes objects), something else, or a sampler built for
# another prediction type or noise schedule.
bad_samplers = st.one_of(
    st.sampled_from(["ddim", "ddpm", "euler"]), junk.filter(lambda value: value is not None), st.just(SCHEDULE),
    st.just(DDIMSampler(SCHEDULE, prediction_type="v_prediction")),
    st.just(DDPMSampler(NoiseSchedule("cosine"))))


@pytest.mark.filterwarnings("ignore:the model cannot use some words:UserWarning")  # odd prompts: expected
@fuzz(300)
@given(pixel=st.booleans(), return_intermediates=st.booleans(), args=arguments(
    prompts=(prompt_lists, bad_prompt_lists),
    num_inference_steps=(st.integers(1, 3), st.one_of(st.sampled_from([0, -1, 1001, 2.5, 10**9, True]), junk)),
    sampler=(samplers, bad_samplers),
    guidance_scale=(st.sampled_from([0.0, 1.0, 3.0, 7.5, 1e30]), st.one_of(
        st.sampled_from([-1.0, float("nan"), float("inf")]), junk)),
    generator=(generators, junk),
    max_batch_size=(st.integers(1, 3), st.one_of(st.integers(-1, 0), st.just(2.0), junk)),
    callback=(st.sampled_from([None, lambda step, timestep, latents: None]), junk)))
def test_generate(pixel, return_intermediates, args):
    model = PIXEL_LDM if pixel else LDM
    out = check(lambda: model.generate(**args, return_intermediates=return_intermediates), *args,
                must_work=args.bad is None)
    if out is not None:
        images = out.images if return_intermediates else out
        n = 1 if isinstance(args["prompts"], str) else len(args["prompts"])
        assert images.shape == (n, 3, 16, 16) and images.dtype == torch.float32


@fuzz(200)
@given(pixel=st.booleans(), args=arguments(
    name=(st.sampled_from(["ddim", "ddpm"]), st.one_of(st.just("euler"), junk)),
    eta=(st.sampled_from([0.0, 0.5, 1.0]), st.one_of(st.sampled_from([-0.1, 1.5, float("nan")]), junk))))
def test_make_sampler(pixel, args):
    # What generate(sampler="ddim", eta=...) checked before samplers became objects: the name and DDIM's eta.
    model = PIXEL_LDM if pixel else LDM
    settings = {"eta": args["eta"]} if args["name"] == "ddim" else {}  # DDPM has no eta
    sampler = check(lambda: model.make_sampler(args["name"], **settings), "name", *settings,
                    must_work=args.bad is None or (args.bad == "eta" and not settings))
    if sampler is not None:
        model.check_sampler(sampler)


@fuzz(300)
@given(pixel=st.booleans(), latent=st.booleans(), B=st.integers(1, 3), side=st.sampled_from([8, 16]), args=st.data())
def test_training_loss(pixel, latent, B, side, args):
    model = PIXEL_LDM if pixel else LDM
    shape = (B, *model.latent_shape()[:1], side // 4, side // 4) if latent and not pixel else (B, 3, side, side)
    shape = (B, 3, side, side) if pixel else shape
    drawn = args.draw(arguments(
        batch=(tensors(shape), st.one_of(bad_tensors(shape), st.just(torch.zeros(B, shape[1], 6, 6)))),
        captions=(st.lists(prompts, min_size=B, max_size=B), st.one_of(st.lists(prompts, max_size=4).filter(
            lambda c: len(c) != B), st.text(), bad_prompt_lists)),
        caption_dropout=(st.floats(0, 1), st.one_of(st.sampled_from([-0.1, 1.1, float("nan")]), junk)),
        generator=(generators, junk)))
    batch, rest = drawn["batch"], {name: value for name, value in drawn.items() if name != "batch"}
    if latent:
        loss = check(lambda: model.latent_training_loss(batch, **rest), "latents", *rest, must_work=drawn.bad is None)
    else:
        loss = check(lambda: model.training_loss(batch, **rest), "images", *rest, must_work=drawn.bad is None)
    if loss is not None:
        assert loss.ndim == 0


# ---- files ---------------------------------------------------------------------------------------------------


def named_path(path, tmp):
    """Relative paths go under `tmp`, so that nothing is written outside it."""
    if isinstance(path, str) and path and not path.startswith("/"):
        return str(tmp / path)
    return path


def path_names(path):
    """What an error about a path may name: the argument, or the path itself."""
    names = ["path", "directory", "root"]
    if isinstance(path, (str, os.PathLike)) and "\0" not in str(path):
        names += [str(path), str(Path(path))]
    return names


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "model"
    LDM.save(folder)
    return folder


@fuzz(300)
@given(elsewhere=st.integers(0, 2), path=paths,
       content=st.one_of(st.sampled_from(["model", "model", "truncated", "pickle", None]), st.binary(max_size=300)))
def test_load_weights(tmp_path_factory, saved_model, elsewhere, path, content):
    tmp = tmp_path_factory.mktemp("weights")
    path = named_path(path, tmp) if elsewhere == 2 else str(tmp / "weights.safetensors")
    if content is not None and isinstance(path, str) and path.startswith(str(tmp)) and "\0" not in path:
        model = (saved_model / "backbone.safetensors").read_bytes()
        content = {"model": model, "truncated": model[: len(path) * 97], "pickle": b"\x80\x04\x95" + b"\x07" * 40}.get(
            content, content)
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(content)
        except (OSError, RecursionError):  # a name too long, or too deep: the load below meets the same path
            pass
    check(lambda: load_weights(path), *path_names(path))


@fuzz(200)
@given(path=st.one_of(st.just("w.safetensors"), st.just("sub/w.safetensors"), paths),
       tensors_=st.one_of(st.dictionaries(st.text(max_size=5), st.sampled_from(
           [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8]).flatmap(
           lambda dtype: tensors((2, 3), dtype)), max_size=3), junk, st.just({1: torch.zeros(1)}),
           st.just({"a": 1.0})))
def test_save_weights(tmp_path_factory, path, tensors_):
    tmp = tmp_path_factory.mktemp("save")
    path = named_path(path, tmp)
    # Never write outside the test's folder; and not 2000 folders deep either: pathlib's mkdir recurses once per
    # level, past Python's recursion limit (no one saves there, but it would not be a clear error).
    if not (isinstance(path, str) and path.startswith(str(tmp))) or path.count("/") > 100:
        path = tmp / "w.safetensors"
    if check(lambda: save_weights(tensors_, path) or "saved", "tensors", *path_names(path)) == "saved":
        loaded = check(lambda: load_weights(path), *path_names(path))
        assert loaded.keys() == tensors_.keys()
        assert all(torch.equal(loaded[k], v) or v.is_floating_point() for k, v in tensors_.items())


json_values = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=8),
                        st.integers(-2, 40), st.sampled_from(["", "epsilon", [16, 16], [True], {}, [], 0.5, [0]]))


def config_leaves(config: dict, where=()) -> list[tuple]:
    """The key path of every field of a nested config that is not itself a dict (a list is one field)."""
    leaves = []
    for key, value in config.items():
        leaves += config_leaves(value, (*where, key)) if isinstance(value, dict) else [(*where, key)]
    return leaves


@fuzz(200)
@given(damage=st.sampled_from(["no damage", "config leaf", "config leaf", "config type", "drop file", "vocab"]),
       which=st.integers(0, 10**6), value=json_values, elsewhere=st.integers(0, 4), directory=paths)
def test_latent_diffusion_load(tmp_path_factory, saved_model, damage, which, value, elsewhere, directory):
    tmp = tmp_path_factory.mktemp("load")
    folder = tmp / "model"
    folder.mkdir()
    for file in saved_model.iterdir():
        os.link(file, folder / file.name)
    config = json.loads((saved_model / "config.json").read_text())
    if damage in ("config leaf", "vocab"):  # one field of the config (or the vocabulary, kept there) replaced
        leaves = config_leaves(config)
        *path, key = leaves[which % len(leaves)] if damage == "config leaf" else ("conditioner", "config", "vocab")
        section = config
        for name in path:
            section = section[name]
        section[key] = value
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(config))
    elif damage == "config type":
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(value))
    elif damage == "drop file":
        files = sorted(folder.iterdir())
        files[which % len(files)].unlink()
    target = named_path(directory, tmp) if elsewhere == 4 else folder  # mostly the model's folder
    loaded = check(lambda: LatentDiffusion.load(target), *path_names(target))
    if damage == "no damage" and target == folder:
        assert loaded is not None
    check(lambda: AutoencoderKL.load(target), *path_names(target))  # no autoencoder.json: refused, clearly


@fuzz(200)
@given(root=st.one_of(st.sampled_from(["empty", "half", "garbage"]), paths),
       split=st.one_of(st.sampled_from(["train", "test"]), st.sampled_from(["val", "TRAIN"]), junk),
       size=st.one_of(st.sampled_from([28, 32]), junk))
def test_load_mnist_root(tmp_path_factory, monkeypatch, root, split, size):
    monkeypatch.delenv("MINILDM_DATA", raising=False)
    tmp = tmp_path_factory.mktemp("mnist")
    monkeypatch.setenv("MINILDM_CACHE", str(tmp / "cache"))  # never the real cache, never the network
    if root in ("empty", "half", "garbage"):  # a folder with none, some or all of the files, all of them broken
        folder = tmp / "data"
        folder.mkdir()
        names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"]
        for name in names[: {"empty": 0, "half": 1, "garbage": 4}[root]]:
            (folder / name).write_bytes(b"\x1f\x8b not really gzip")
        root = folder
    elif root is None:  # None means "look in the usual places, then the network": not what this tests
        root = tmp / "nothing"
    else:
        root = named_path(root, tmp)
    check(lambda: load_mnist(split, root=root, size=size, progress=False), "split", "size", *path_names(root))
