"""Exercises of notebook 11, fast samplers and transformers: DPM-Solver++'s first-order and 2M steps, the
zero-terminal-SNR rescale of the betas, and a DiT's patchify.

Notation as in samplers/dpm_solver.py and schedule.py: x_s = α_s x_0 + σ_s ε with α = sqrt(ᾱ), σ = sqrt(1 - ᾱ);
λ = log(α / σ), the half log-SNR; a step goes from timestep s to the next one of the loop, t (less noise, larger
λ), h = λ_t - λ_s; "previous" is the step before, from s_prev to s, h_prev = λ_s - λ_{s_prev}, r = h_prev / h;
x̂_0 the data prediction (a model's ε or v converted). B batch, C channels, p the patch size, N patches.
Each solution below is the code of the notebook's solution cell (between # BEGIN SOLUTION and # END SOLUTION);
each Mistake is a wrong answer students write, with the hint it earns. minildm's own code is the reference:
DPMSolverMultistepSampler.step, schedule.rescale_zero_terminal_snr, DiTTransformer2DModel.patchify.
"""

from __future__ import annotations

import torch

from ..dit import DiTConfig, DiTTransformer2DModel
from ..samplers import DPMSolverMultistepSampler
from ..schedule import ALPHA_BAR_FLOOR, NoiseSchedule
from ..schedule import rescale_zero_terminal_snr as minildm_rescale_zero_terminal_snr
from .core import Exercise, Mistake

SOURCE_LU = "Lu et al. 2022 (arXiv:2211.01095), DPM-Solver++"
SCHEDULES = {"plain": NoiseSchedule(), "zero_snr": NoiseSchedule(rescale_betas_zero_snr=True)}


def _samples(seed: int, count: int, shape=(2, 3, 5, 4)):
    g = torch.Generator().manual_seed(1100 + seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]


def _alpha_bar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


# The samplers whose steps the cases take: (schedule, timestep_spacing, final_sigmas_type, num_inference_steps)
DPM_SETTINGS = (("plain", "trailing", "zero", 10),  # LatentDiffusion.make_sampler("dpm_solver")'s kind
                ("zero_snr", "trailing", "zero", 7),  # its first step starts from ᾱ = 0, floored at 2⁻²⁴
                ("plain", "linspace", "sigma_min", 20),  # diffusers' default spacing; the last step lands on ᾱ_0
                ("zero_snr", "leading", "sigma_min", 6))


def _dpm_sampler(setting, solver_order: int) -> DPMSolverMultistepSampler:
    schedule, spacing, final, n = setting
    sampler = DPMSolverMultistepSampler(SCHEDULES[schedule], solver_order=solver_order, timestep_spacing=spacing,
                                        final_sigmas_type=final, prediction_type="sample")
    sampler.set_timesteps(n)
    return sampler


def _solver_alpha_bar(setting, t: int) -> float:
    """ᾱ_t as the solver uses it: floored at ALPHA_BAR_FLOOR, so that λ_t is finite where ᾱ_t = 0."""
    return max(SCHEDULES[setting[0]].alphas_cumprod[t].item(), ALPHA_BAR_FLOOR)


def _target_alpha_bar(setting, sampler: DPMSolverMultistepSampler, t: int) -> float:
    """ᾱ of where the step from t lands: the next timestep's, or after the last one 1 ("zero") or ᾱ_0."""
    prev = sampler.previous_timestep(t)
    if prev >= 0:
        return _solver_alpha_bar(setting, prev)
    return 1.0 if setting[2] == "zero" else _solver_alpha_bar(setting, 0)


def _steps(setting, solver_order: int):
    """(timesteps visited before, t, ᾱ_{s_prev}, ᾱ_s, ᾱ_t) for every step of the setting's loop."""
    sampler = _dpm_sampler(setting, solver_order)
    timesteps = sampler.timesteps.tolist()
    for i, t in enumerate(timesteps):
        previous = timesteps[i - 1] if i > 0 else None
        alpha_bar_previous = _solver_alpha_bar(setting, previous) if previous is not None else None
        yield previous, t, alpha_bar_previous, _solver_alpha_bar(setting, t), _target_alpha_bar(setting, sampler, t)


# ---- the first-order step, which is DDIM ----------------------------------------------------------------------


def dpm_solver_first_order_step(sample, x0_pred, alpha_bar_s, alpha_bar_t):
    # BEGIN SOLUTION
    alpha_s, sigma_s = alpha_bar_s.sqrt(), (1 - alpha_bar_s).sqrt()  # x_s = α_s x_0 + σ_s ε
    alpha_t, sigma_t = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    h = torch.log(alpha_t / sigma_t) - torch.log(alpha_s / sigma_s)  # h = λ_t - λ_s, with λ = log(α / σ)
    return (sigma_t / sigma_s) * sample - alpha_t * torch.expm1(-h) * x0_pred  # eq. (9) with x̂_0 held constant
    # END SOLUTION


def _first_order_cases(seed):
    sample, x0_pred = _samples(seed, 2)
    g = torch.Generator().manual_seed(seed)
    cases, last = [], []
    for setting in DPM_SETTINGS:
        steps = list(_steps(setting, solver_order=1))
        middle = int(torch.randint(1, len(steps) - 1, (), generator=g))
        for index in (0, middle, len(steps) - 1):
            *_, alpha_bar_s, alpha_bar_t = steps[index]
            case = {"sample": sample, "x0_pred": x0_pred, "alpha_bar_s": _alpha_bar(alpha_bar_s),
                    "alpha_bar_t": _alpha_bar(alpha_bar_t)}
            # the steps onto a clean x_0 (σ_t = 0, λ_t = ∞) come last: a wrong answer is named on a finite step first
            (last if alpha_bar_t == 1.0 else cases).append(case)
    return cases + last


def _find_step(solver_order: int, alpha_bar_s, alpha_bar_t, alpha_bar_previous=None):
    """(setting, s_prev, s) of the step of DPM_SETTINGS whose ᾱs these are."""
    key = (alpha_bar_s.item(), alpha_bar_t.item(), None if alpha_bar_previous is None else alpha_bar_previous.item())
    for setting in DPM_SETTINGS:
        for previous, t, a_previous, a_s, a_t in _steps(setting, solver_order):
            if (a_s, a_t, a_previous if alpha_bar_previous is not None else None) == key:
                return setting, previous, t
    raise ValueError("not a step of DPM_SETTINGS")


def _sampler_first_order_step(sample, x0_pred, alpha_bar_s, alpha_bar_t):
    """DPMSolverMultistepSampler(solver_order=1).step for the step of DPM_SETTINGS with these ᾱs, the model's
    output being x̂_0 itself (prediction_type="sample")."""
    setting, _, t = _find_step(1, alpha_bar_s, alpha_bar_t)
    return _dpm_sampler(setting, solver_order=1).step(x0_pred, t, sample).prev_sample


def _first_order_mistake(half=True, h_sign=1, minus_one=True, alpha_coefficient=True, sigma_ratio=True):
    def step(sample, x0_pred, alpha_bar_s, alpha_bar_t):
        alpha_s, sigma_s = alpha_bar_s.sqrt(), (1 - alpha_bar_s).sqrt()
        alpha_t, sigma_t = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
        factor = 1 if half else 2  # log(ᾱ / (1 - ᾱ)) = 2 log(α / σ)
        h = h_sign * factor * (torch.log(alpha_t / sigma_t) - torch.log(alpha_s / sigma_s))
        decay = torch.expm1(-h) if minus_one else torch.exp(-h)
        ratio = sigma_t / sigma_s if sigma_ratio else alpha_t / alpha_s
        return ratio * sample - (alpha_t if alpha_coefficient else sigma_t) * decay * x0_pred
    return step


DPM_SOLVER_FIRST_ORDER_STEP = Exercise(
    name="dpm_solver_first_order_step", notebook="11_fast_samplers_and_transformers",
    task="dpm_solver_first_order_step(sample, x0_pred, alpha_bar_s, alpha_bar_t) -> x_t (B, C, H, W): one "
         "first-order DPM-Solver++ step from x_s (`sample`) to the next timestep t of the loop, with the data "
         "prediction x̂_0 (`x0_pred`) held constant over the step. alpha_bar_s and alpha_bar_t are 0-dim float64 "
         "tensors (ᾱ_s is never 0: the solver floors it at 2⁻²⁴; ᾱ_t is 1 for the last step onto a clean x_0, "
         "where σ_t = 0 and λ_t = ∞).",
    source=f"{SOURCE_LU}, eq. (9) with x̂_0 constant: x_t = (σ_t / σ_s) x_s - α_t (e^(-h) - 1) x̂_0, h = λ_t - λ_s, "
           "λ = log(α / σ), α = sqrt(ᾱ), σ = sqrt(1 - ᾱ); it equals DDIM's eq. (12) with η = 0",
    solution=dpm_solver_first_order_step, cases=_first_order_cases, reference=_sampler_first_order_step,
    mistakes=(
        Mistake("λ is the half log-SNR, log(α / σ) = ½ log(ᾱ / (1 - ᾱ)): log(ᾱ / (1 - ᾱ)) doubles every step h",
                _first_order_mistake(half=False)),
        Mistake("h = λ_t - λ_s is positive: the step goes towards less noise, where λ is larger; λ_s - λ_t flips it",
                _first_order_mistake(h_sign=-1)),
        Mistake("the integral σ_t ∫ e^λ dλ from λ_s to λ_t is α_t (1 - e^(-h)): the coefficient of x̂_0 is "
                "-α_t (e^(-h) - 1), with the - 1 (torch.expm1(-h))", _first_order_mistake(minus_one=False)),
        Mistake("x̂_0's coefficient is α_t (1 - e^(-h)): σ_t e^(λ_t) = α_t, not σ_t",
                _first_order_mistake(alpha_coefficient=False)),
        Mistake("x_s's coefficient is σ_t / σ_s in the data-prediction form of DPM-Solver++; α_t / α_s belongs to "
                "the noise-prediction form (DPM-Solver), which holds ε constant instead of x̂_0",
                _first_order_mistake(sigma_ratio=False)),
    ),
)


# ---- the second-order multistep step (2M) -----------------------------------------------------------------------


def dpm_solver_2m_step(sample, x0_pred, previous_x0_pred, alpha_bar_previous, alpha_bar_s, alpha_bar_t):
    # BEGIN SOLUTION
    def half_log_snr(alpha_bar):  # λ = log(α / σ) = ½ log(ᾱ / (1 - ᾱ))
        return torch.log(alpha_bar.sqrt() / (1 - alpha_bar).sqrt())

    lambda_previous, lambda_s, lambda_t = (half_log_snr(a) for a in (alpha_bar_previous, alpha_bar_s, alpha_bar_t))
    h, h_previous = lambda_t - lambda_s, lambda_s - lambda_previous  # this step's length and the one before
    r = h_previous / h
    d = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * previous_x0_pred  # x̂_0 extrapolated to the step's middle
    sigma_ratio = ((1 - alpha_bar_t) / (1 - alpha_bar_s)).sqrt()  # σ_t / σ_s
    return sigma_ratio * sample - alpha_bar_t.sqrt() * torch.expm1(-h) * d  # Algorithm 2: the first-order step on D
    # END SOLUTION


def _second_order_cases(seed):
    sample, x0_pred, previous_x0_pred = _samples(seed, 3)
    g = torch.Generator().manual_seed(10 + seed)
    cases = []
    for setting in DPM_SETTINGS:
        steps = list(_steps(setting, solver_order=2))
        # The solver's 2M steps: all but the first (no previous x̂_0) and the last, which is first order under 15
        # steps (diffusers' lower_order_final) and lands on x̂_0 itself where it ends on a clean x_0 (σ_t = 0).
        steps = steps[1:] if setting[3] >= 15 and setting[2] != "zero" else steps[1:-1]
        picks = {0, len(steps) - 1, int(torch.randint(0, len(steps), (), generator=g))}
        for index in sorted(picks):
            _, _, alpha_bar_previous, alpha_bar_s, alpha_bar_t = steps[index]
            cases.append({"sample": sample, "x0_pred": x0_pred, "previous_x0_pred": previous_x0_pred,
                          "alpha_bar_previous": _alpha_bar(alpha_bar_previous), "alpha_bar_s": _alpha_bar(alpha_bar_s),
                          "alpha_bar_t": _alpha_bar(alpha_bar_t)})
    return cases


def _sampler_2m_step(sample, x0_pred, previous_x0_pred, alpha_bar_previous, alpha_bar_s, alpha_bar_t):
    """DPMSolverMultistepSampler.step at s_prev with x̂_0(s_prev) as the model's output (which the solver keeps),
    then at s with x̂_0(s) from `sample`: the 2M step of DPM_SETTINGS with these ᾱs."""
    setting, previous, t = _find_step(2, alpha_bar_s, alpha_bar_t, alpha_bar_previous)
    sampler = _dpm_sampler(setting, solver_order=2)
    sampler.step(previous_x0_pred, previous, sample)  # its x_prev is not used: only its x̂_0 is remembered
    return sampler.step(x0_pred, t, sample).prev_sample


def _second_order_mistake(r_inverted=False, extrapolation_sign=1, half=True, first_order=False):
    def step(sample, x0_pred, previous_x0_pred, alpha_bar_previous, alpha_bar_s, alpha_bar_t):
        def half_log_snr(alpha_bar):
            return torch.log(alpha_bar.sqrt() / (1 - alpha_bar).sqrt())

        lambda_previous, lambda_s, lambda_t = (half_log_snr(a) for a in (alpha_bar_previous, alpha_bar_s,
                                                                          alpha_bar_t))
        h, h_previous = lambda_t - lambda_s, lambda_s - lambda_previous
        r = h / h_previous if r_inverted else h_previous / h
        weight = extrapolation_sign / (2 * r if half else r)
        d = x0_pred if first_order else (1 + weight) * x0_pred - weight * previous_x0_pred
        sigma_ratio = ((1 - alpha_bar_t) / (1 - alpha_bar_s)).sqrt()
        return sigma_ratio * sample - alpha_bar_t.sqrt() * torch.expm1(-h) * d
    return step


DPM_SOLVER_2M_STEP = Exercise(
    name="dpm_solver_2m_step", notebook="11_fast_samplers_and_transformers",
    task="dpm_solver_2m_step(sample, x0_pred, previous_x0_pred, alpha_bar_previous, alpha_bar_s, alpha_bar_t) -> "
         "x_t (B, C, H, W): one DPM-Solver++(2M) step from x_s (`sample`) to t, with x̂_0 taken linear in λ: its "
         "slope from this step's x̂_0(s) and the previous step's x̂_0(s_prev) (`previous_x0_pred`), so no extra "
         "network call. The ᾱs are 0-dim float64 tensors of s_prev, s and t (none of them 0 or 1).",
    source=f"{SOURCE_LU}, Algorithm 2: r = h_prev / h, D = (1 + 1/(2r)) x̂_0(s) - 1/(2r) x̂_0(s_prev), "
           "x_t = (σ_t / σ_s) x_s - α_t (e^(-h) - 1) D, with h = λ_t - λ_s, h_prev = λ_s - λ_{s_prev}, λ = log(α / σ)",
    solution=dpm_solver_2m_step, cases=_second_order_cases, reference=_sampler_2m_step,
    mistakes=(
        Mistake("r = h_prev / h, the previous step's length over this one's; h / h_prev is its inverse",
                _second_order_mistake(r_inverted=True)),
        Mistake("D extrapolates x̂_0 forward, away from the previous prediction: D = x̂_0(s) + (x̂_0(s) - x̂_0(s_prev)) "
                "/ (2r); interpolating back towards x̂_0(s_prev) flips the sign of the slope term",
                _second_order_mistake(extrapolation_sign=-1)),
        Mistake("the factor ½ is missing: D = (1 + 1/(2r)) x̂_0(s) - 1/(2r) x̂_0(s_prev) is the line read half-way "
                "into the step, which is what the integral of eq. (9) weighs it at; 1/r reads it at the step's end",
                _second_order_mistake(half=False)),
        Mistake("that is the first-order step: the 2M step replaces x̂_0(s) by D, which uses the previous step's "
                "x̂_0 too", _second_order_mistake(first_order=True)),
    ),
)


# ---- zero terminal SNR -----------------------------------------------------------------------------------------


def rescale_zero_terminal_snr(betas):
    # BEGIN SOLUTION
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()  # sqrt(ᾱ_t): (T,)
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)  # shift: last -> 0; scale: first kept
    alphas_bar = alphas_bar_sqrt**2  # ᾱ_t
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])  # α_t = ᾱ_t / ᾱ_{t-1}, α_0 = ᾱ_0
    return 1 - alphas  # β_t; the last is 1
    # END SOLUTION


def _rescale_cases(seed):
    return [{"betas": NoiseSchedule(beta_schedule, num_train_timesteps=T).betas}
            for beta_schedule, T in (("scaled_linear", 1000), ("linear", 50 + 7 * seed), ("cosine", 200 + seed))]


def _rescale_mistake(scale=True, on_sqrt=True, ratios=True, keep_first=True, square=True):
    def rescale(betas):
        alphas_bar = torch.cumprod(1 - betas, dim=0)
        values = alphas_bar.sqrt() if on_sqrt else alphas_bar
        first, last = values[0].clone(), values[-1].clone()
        values = (values - last) * (first / (first - last) if scale else 1)
        alphas_bar = (values**2 if square else values) if on_sqrt else values
        if not ratios:
            return 1 - alphas_bar
        start = alphas_bar[:1] if keep_first else torch.ones_like(alphas_bar[:1])
        return 1 - torch.cat([start, alphas_bar[1:] / alphas_bar[:-1]])
    return rescale


RESCALE_ZERO_TERMINAL_SNR = Exercise(
    name="rescale_zero_terminal_snr", notebook="11_fast_samplers_and_transformers",
    task="rescale_zero_terminal_snr(betas) -> betas (T,), float64: new betas whose ᾱ ends at exactly 0 (SNR 0 at "
         "t = T - 1) while ᾱ_0 is unchanged, by shifting sqrt(ᾱ_t) down by its last value and scaling it so that "
         "its first value is kept; then the betas read back from the new ᾱ.",
    source="Lin et al. 2023 (arXiv:2305.08891), section 3.1 and Algorithm 1: sqrt(ᾱ)' = (sqrt(ᾱ) - sqrt(ᾱ_{T-1})) "
           "sqrt(ᾱ_0) / (sqrt(ᾱ_0) - sqrt(ᾱ_{T-1})), then ᾱ' = sqrt(ᾱ)'², α_t = ᾱ_t / ᾱ_{t-1}, β_t = 1 - α_t",
    solution=rescale_zero_terminal_snr, cases=_rescale_cases, reference=minildm_rescale_zero_terminal_snr,
    mistakes=(
        Mistake("shifting alone changes ᾱ_0 too: after subtracting sqrt(ᾱ_{T-1}), scale by sqrt(ᾱ_0) / (sqrt(ᾱ_0) "
                "- sqrt(ᾱ_{T-1})) so that the first step keeps its signal", _rescale_mistake(scale=False)),
        Mistake("Algorithm 1 shifts and scales sqrt(ᾱ_t), the signal's amplitude, not ᾱ_t: the two give other "
                "schedules in between", _rescale_mistake(on_sqrt=False)),
        Mistake("1 - ᾱ_t is the noise variance of x_t, not β_t: read the betas back from ratios, α_t = ᾱ_t / ᾱ_{t-1} "
                "and β_t = 1 - α_t", _rescale_mistake(ratios=False)),
        Mistake("α_0 = ᾱ_0 (the product has one factor at t = 0), not 1: β_0 must stay what it was",
                _rescale_mistake(keep_first=False)),
        Mistake("the rescaled values are sqrt(ᾱ_t): square them back before taking the ratios",
                _rescale_mistake(square=False)),
    ),
)


# ---- a DiT's patchify -----------------------------------------------------------------------------------------


def patchify(sample, patch_size):
    # BEGIN SOLUTION
    B, C, H, W = sample.shape
    p = patch_size
    x = sample.reshape(B, C, H // p, p, W // p, p)  # (B, C, H, W) -> (B, C, H/p, p, W/p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # -> (B, H/p, W/p, p, p, C): patch row, patch column, then its pixels
    return x.reshape(B, (H // p) * (W // p), p * p * C)  # -> (B, N, p·p·C): patches row by row
    # END SOLUTION


def _patchify_cases(seed):
    g = torch.Generator().manual_seed(1200 + seed)
    # (B, C, H, W, p): N and p·p·C differ, so that a transposed answer shows; p = 1 is a pixel per token
    shapes = ((2, 3, 8, 4, 2), (1, 1, 12, 8, 4), (3, 4, 9, 6 + 3 * seed, 3), (2, 5, 4, 6, 2), (2, 4, 3, 5, 1))
    return [{"sample": torch.randn(B, C, H, W, generator=g, dtype=torch.float64), "patch_size": p}
            for B, C, H, W, p in shapes]


def pixel_copying_dit(in_channels: int, patch_size: int) -> DiTTransformer2DModel:
    """A DiT whose patch embedding copies each patch's pixels into its token, in (row, column, channel) order:
    hidden_size = p·p·C, and token channel (i p + j) C + c reads pixel (c, i, j) of its patch. Its patchify is
    then the reshape of the exercise; its other layers are never used. p·p·C must be a multiple of 4, as any DiT's
    width (its 2-D position embedding)."""
    p, C = patch_size, in_channels
    with torch.random.fork_rng(devices=[]):  # building a model draws weights: leave the notebook's random state
        dit = DiTTransformer2DModel(DiTConfig(in_channels=C, out_channels=C, patch_size=p, hidden_size=p * p * C,
                                              num_layers=1, num_attention_heads=1, cross_attention_dim=None))
    weight = torch.zeros(p * p * C, C, p, p)  # (D, C, p, p)
    for i in range(p):
        for j in range(p):
            for c in range(C):
                weight[(i * p + j) * C + c, c, i, j] = 1.0
    with torch.no_grad():
        dit.patch_embed.weight.copy_(weight)
        dit.patch_embed.bias.zero_()
    return dit


def _dit_patchify(sample, patch_size):
    dit = pixel_copying_dit(sample.shape[1], patch_size).to(sample.dtype)
    with torch.no_grad():
        return dit.patchify(sample)


def _patchify_mistake(order=(0, 2, 4, 3, 5, 1), permute=True):
    def wrong(sample, patch_size):
        B, C, H, W = sample.shape
        p = patch_size
        if not permute:
            return sample.reshape(B, (H // p) * (W // p), p * p * C)
        x = sample.reshape(B, C, H // p, p, W // p, p).permute(*order)
        return x.reshape(B, (H // p) * (W // p), p * p * C)
    return wrong


PATCHIFY = Exercise(
    name="patchify", notebook="11_fast_samplers_and_transformers",
    task="patchify(sample, patch_size) -> tokens (B, N, p·p·C): cut latents (B, C, H, W) into p x p patches, "
         "N = (H/p)(W/p) of them taken row by row, each flattened into one token in (row, column, channel) order, "
         "the order minildm.dit.unpatchify reads back. H and W are multiples of p.",
    source="Peebles & Xie 2023 (arXiv:2212.09748), section 3.1 ('Patchify', fig. 4): a p x p patch per token, "
           "T = (I/p)² tokens; DiT computes it as a Conv2d with kernel = stride = p, which here copies the pixels",
    solution=patchify, cases=_patchify_cases, reference=_dit_patchify,
    mistakes=(
        Mistake("each token lists its patch's pixels in (row, column, channel) order, as dit.unpatchify reads them "
                "back: permute to (B, H/p, W/p, p, p, C); (channel, row, column) is the order of "
                "nn.Unfold, another layout of the same numbers", _patchify_mistake(order=(0, 2, 4, 1, 3, 5))),
        Mistake("a reshape alone does not gather a patch: its pixels are not next to each other in memory; split H "
                "and W into (H/p, p) and (W/p, p), then permute", _patchify_mistake(permute=False)),
        Mistake("the patches go row by row, n = row · (W/p) + column, as the position embedding numbers them; "
                "yours go column by column", _patchify_mistake(order=(0, 4, 2, 3, 5, 1))),
        Mistake("inside a patch the pixels go row by row too: (row, column, channel), not (column, row, channel)",
                _patchify_mistake(order=(0, 2, 4, 5, 3, 1))),
    ),
)


EXERCISES = [DPM_SOLVER_FIRST_ORDER_STEP, DPM_SOLVER_2M_STEP, RESCALE_ZERO_TERMINAL_SNR, PATCHIFY]  # notebook's order
