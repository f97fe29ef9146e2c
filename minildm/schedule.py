"""The noise schedule of a diffusion model: betas, alphas_cumprod, add_noise, SNR and conversions.

The forward process (Ho et al. 2020, arXiv:2006.11239) adds a little Gaussian noise at each step,

    q(x_t | x_{t-1}) = N(sqrt(1 - β_t) x_{t-1}, β_t I)                         (Ho eq. 2)

and composing the steps gives a closed form that jumps straight from the data x_0 to any step t,

    q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I),  i.e.  x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   (Ho eq. 4)

Everything else here is algebra on that one line. A network may predict ε ("epsilon"), x_0
("sample") or the velocity v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 ("v_prediction", Salimans & Ho 2022,
arXiv:2202.00512); given x_t, any one of them determines the other two.

Notation (index t runs over 0 .. T-1, as in code; the papers count 1 .. T):

| symbol   | code                       | meaning                                        |
|----------|----------------------------|------------------------------------------------|
| T        | num_train_timesteps        | number of noising steps used in training       |
| β_t      | betas[t]                   | variance of the noise added at step t          |
| α_t      | alphas[t] = 1 - β_t        | fraction of the signal's variance kept         |
| ᾱ_t      | alphas_cumprod[t]          | α_0 α_1 ... α_t: signal variance left at t     |
| SNR(t)   | snr(t) = ᾱ_t / (1 - ᾱ_t)   | signal-to-noise ratio of x_t                   |
| ε        | noise                      | standard Gaussian noise                        |

Depends on torch only.
"""

from __future__ import annotations

import math
import numbers

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# The smallest ᾱ_t an ε-prediction is converted with: ᾱ = 0 (zero terminal SNR) would divide by zero.
ALPHA_BAR_FLOOR = 2.0**-24
MAX_TRAIN_TIMESTEPS = 100_000  # models train with 1000 to 4000; far more is a mistake that would fill the memory


def check_samples(first: torch.Tensor, first_name: str, second: torch.Tensor, second_name: str) -> None:
    """Two floating-point tensors of one shape on one device, or an error naming the one that is not.
    (The samplers check model_output and sample with it too.)"""
    for value, name in ((first, first_name), (second, second_name)):
        if not torch.is_tensor(value) or not value.is_floating_point():
            got = f"a {value.dtype} tensor" if torch.is_tensor(value) else type(value).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if second.shape != first.shape:
        raise ValueError(f"{second_name} must have the shape of {first_name} {tuple(first.shape)}, "
                         f"got {tuple(second.shape)}")
    if second.device != first.device:
        raise ValueError(f"{second_name} is on {second.device} but {first_name} is on {first.device}: "
                         f"move one of them")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas (T,) whose ᾱ ends at exactly 0 and starts where it did (Lin et al. 2023, Algorithm 1).

    sqrt(ᾱ_t) is shifted down by its last value, then scaled so that its first value is unchanged:
        sqrt(ᾱ_t)' = (sqrt(ᾱ_t) - sqrt(ᾱ_{T-1})) · sqrt(ᾱ_0) / (sqrt(ᾱ_0) - sqrt(ᾱ_{T-1}))
    and the betas are read back from the new ᾱ: β_t = 1 - ᾱ_t / ᾱ_{t-1}, so β_{T-1} = 1.
    """
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()  # (T,)
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)  # last -> 0, first -> first
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # α_t = ᾱ_t / ᾱ_{t-1}
    return 1 - alphas


def _is_plain_timestep(timesteps, num_train_timesteps: int) -> bool:
    """True for a python int (not a bool) in 0 .. T-1: the one timestep of a sampler's step, which needs no
    tensor made and checked. A speed shortcut: it took a third of a DDIM step at batch 1
    (benchmarks/sampling.py); everything else goes through _check_timesteps."""
    return type(timesteps) is int and 0 <= timesteps < num_train_timesteps


class NoiseSchedule:
    """The betas of the forward process and everything derived from them.

    beta_schedule:
      - "linear": β_t evenly spaced from beta_start to beta_end (Ho et al. 2020 used 1e-4 .. 0.02).
      - "scaled_linear": sqrt(β_t) evenly spaced, then squared. Stable Diffusion's schedule, with the
        defaults beta_start=0.00085, beta_end=0.012; it keeps more signal at large t than "linear".
      - "cosine": Nichol & Dhariwal 2021 (arXiv:2102.09672, eq. 17), ᾱ_t ∝ cos²((t/T + s)/(1 + s) · π/2)
        with s = 0.008 and each β_t capped at 0.999 (diffusers calls it "squaredcos_cap_v2").
        It ignores beta_start and beta_end.

    rescale_betas_zero_snr: shift and scale sqrt(ᾱ_t) so that ᾱ at the last step is exactly 0 (the
      signal-to-noise ratio ends at zero, as the sampler's starting noise assumes) while ᾱ_0 is kept
      (Lin et al. 2023, arXiv:2305.08891, sec. 3.1 and Algorithm 1; diffusers' name). Without it a
      model trained on a little signal left at t = T - 1 (sqrt(ᾱ) = 0.068 for "scaled_linear") never
      learns to make images much darker or brighter than average. Pair it with v-prediction (their
      sec. 3.2): at SNR 0 the noise ε says nothing about x_0, so an ε-model cannot give x̂_0 there; the
      conversions then floor ᾱ at ALPHA_BAR_FLOOR = 2⁻²⁴ (diffusers' Euler and DPM-Solver do the same), so
      x̂_0 stays finite, but it is the noise prediction magnified 4096 times.

    The tensors are computed and stored in float64 on the CPU; methods cast what they pick out to
    the dtype and device of the tensor they are given.

    Training draws one t per sample and noises the batch in one call:

        schedule = NoiseSchedule()
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],))  # (B,)
        x_t = schedule.add_noise(x0, torch.randn_like(x0), t)  # (B, C, H, W)
    """

    def __init__(
        self,
        beta_schedule: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        rescale_betas_zero_snr: bool = False,
    ):
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if (not isinstance(num_train_timesteps, numbers.Integral) or isinstance(num_train_timesteps, bool)
                or not 1 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS):
            raise ValueError(f"num_train_timesteps must be an integer from 1 to {MAX_TRAIN_TIMESTEPS}, "
                             f"got {num_train_timesteps!r}")
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not isinstance(value, numbers.Real) or not 0 < value < 1:
                raise ValueError(f"{name} is a variance per step and must lie in (0, 1), got {value}")
        if beta_start > beta_end:
            raise ValueError(
                f"beta_start must not exceed beta_end (noise grows with t), got {beta_start} > {beta_end}"
            )
        if not isinstance(rescale_betas_zero_snr, bool):
            raise TypeError(f"rescale_betas_zero_snr must be True or False, got {rescale_betas_zero_snr!r}")
        if rescale_betas_zero_snr and num_train_timesteps < 2:
            raise ValueError("rescale_betas_zero_snr needs num_train_timesteps >= 2: with one step, ᾱ_0 would be 0")
        self.beta_schedule = beta_schedule
        self.rescale_betas_zero_snr = rescale_betas_zero_snr
        self.num_train_timesteps = T = int(num_train_timesteps)
        self.beta_start = beta_start
        self.beta_end = beta_end

        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        else:  # "cosine"
            s = 0.008  # offset so that β_0 is not vanishingly small (Nichol & Dhariwal, sec. 3.2)
            time = torch.arange(T + 1, dtype=torch.float64) / T  # (T+1,) from 0 to 1
            f = torch.cos((time + s) / (1 + s) * math.pi / 2) ** 2  # ᾱ up to a constant factor
            # β_t = 1 - ᾱ_t / ᾱ_{t-1}; near t = T the ratio goes to 0, and β_t = 1 would leave no
            # signal at all, so each β is capped at 0.999 as in the paper.
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)

        self.betas = betas  # (T,) β_t
        self.alphas = 1.0 - betas  # (T,) α_t
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,) ᾱ_t
        # ᾱ_t for dividing by sqrt(ᾱ_t): the same but at ᾱ_t = 0 (zero terminal SNR), which is ALPHA_BAR_FLOOR
        self._alphas_cumprod_floored = self.alphas_cumprod.clamp(min=ALPHA_BAR_FLOOR)

    def config_dict(self) -> dict:
        """The arguments that rebuild this schedule: NoiseSchedule(**schedule.config_dict())."""
        config = {"beta_schedule": self.beta_schedule, "num_train_timesteps": self.num_train_timesteps,
                  "beta_start": self.beta_start, "beta_end": self.beta_end}
        if self.rescale_betas_zero_snr:  # only when set: folders written before it existed read the same
            config["rescale_betas_zero_snr"] = True
        return config

    def __eq__(self, other) -> bool:
        """Two schedules are equal when they give the same ᾱ_t: a sampler must use its model's."""
        if not isinstance(other, NoiseSchedule):
            return NotImplemented
        return torch.equal(self.alphas_cumprod, other.alphas_cumprod)

    def __repr__(self) -> str:
        T = self.num_train_timesteps
        # cosine ignores beta_start and beta_end, so showing them would mislead
        ends = "" if self.beta_schedule == "cosine" else f", beta_start={self.beta_start}, beta_end={self.beta_end}"
        first, last = self.alphas_cumprod[0].item(), self.alphas_cumprod[-1].item()
        zero_snr = ", rescale_betas_zero_snr=True" if self.rescale_betas_zero_snr else ""
        return (
            f"NoiseSchedule(beta_schedule={self.beta_schedule!r}, num_train_timesteps={T}{ends}{zero_snr}) "
            f"with alphas_cumprod from {first:.5f} at t=0 to {last:.3g} at t={T - 1} "
            f"(SNR {first / (1 - first):.4g} -> {last / (1 - last):.3g})"
        )

    # ----------------------------------------------------------------------------- indexing

    def _check_timesteps(self, timesteps: int | torch.Tensor) -> torch.Tensor:
        """Return `timesteps` as a CPU long tensor of shape () or (B,), after checking the range."""
        T = self.num_train_timesteps
        if isinstance(timesteps, torch.Tensor):
            if (timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool
                    or timesteps.ndim > 1):
                raise ValueError(
                    "timesteps must be a python int or a 0-d / 1-d integer tensor, "
                    f"got a {timesteps.dtype} tensor of shape {tuple(timesteps.shape)}"
                )
            t = timesteps.to("cpu", torch.long)
        elif isinstance(timesteps, numbers.Integral) and not isinstance(timesteps, bool):
            if not 0 <= timesteps < T:  # checked before torch.tensor(), which overflows past 2**63
                raise ValueError(f"timesteps must be between 0 and {T - 1} (num_train_timesteps={T}), got {timesteps}")
            return torch.tensor(int(timesteps))  # in range: no tensor checks below (samplers call this every step)
        else:
            raise ValueError(f"timesteps must be a python int or an integer tensor, got {timesteps!r}")
        if t.numel() > 0 and (t.min() < 0 or t.max() >= T):
            raise ValueError(
                f"timesteps must be between 0 and {T - 1} (num_train_timesteps={T}), "
                f"got values from {t.min().item()} to {t.max().item()}"
            )
        return t

    def _gather(self, values: torch.Tensor, timesteps: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
        """Pick values[t] for each sample and shape it to broadcast against `like`.

        (B,) timesteps -> a (B, 1, ..., 1) tensor with as many dims as `like`, with its dtype and device.
        One timestep (an int or a 0-d tensor) -> a python float: it scales a tensor of any dtype on any
        device as it is, with no tensor to make and, on a GPU, no copy that would make the host wait at
        every sampler step.
        """
        if _is_plain_timestep(timesteps, self.num_train_timesteps):
            return values[timesteps].item()  # a sampler's step: no tensor made and checked (a speed shortcut)
        t = self._check_timesteps(timesteps)
        if t.ndim == 0:
            return values[int(t)].item()
        out = values[t]  # (B,)
        if like.ndim == 0 or out.shape[0] not in (1, like.shape[0]):
            raise ValueError(
                f"got {out.shape[0]} timesteps for a batch of shape {tuple(like.shape)}; pass one "
                "timestep per sample (shape (B,)) or a single int"
            )
        out = out.reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, ..., 1)
        # Cast on the CPU before moving: some devices (Apple's MPS) have no float64.
        return out.to(dtype=like.dtype).to(like.device)

    # ----------------------------------------------------------------------------- forward process

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor
    ) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) in one jump: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε  (Ho eq. 4).

        original_samples, noise: (B, ...) of the same shape; timesteps: (B,) integers or an int.
        """
        check_samples(original_samples, "original_samples", noise, "noise")
        alpha_bar = self._gather(self.alphas_cumprod, timesteps, original_samples)  # (B, 1, ..., 1)
        return alpha_bar ** 0.5 * original_samples + (1 - alpha_bar) ** 0.5 * noise  # Ho eq. 4

    def snr(self, timesteps: int | torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 - ᾱ_t); decreasing in t.

        Returns float32 (computed in float64) with the shape and device of `timesteps`, ready to
        weight a loss (e.g. min-SNR weighting, Hang et al. 2023).
        """
        t = self._check_timesteps(timesteps)
        alpha_bar = self.alphas_cumprod[t]  # () or (B,), float64
        device = timesteps.device if isinstance(timesteps, torch.Tensor) else "cpu"
        return (alpha_bar / (1 - alpha_bar)).to(torch.float32).to(device)

    # ----------------------------------------------------------------------------- conversions
    # With a = sqrt(ᾱ_t) and s = sqrt(1 - ᾱ_t), so that a² + s² = 1:
    #     x_t = a x_0 + s ε        v = a ε - s x_0
    # Solving this pair of linear equations gives each line below.

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor):
        """The v-prediction target v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022, sec. 4).

        `sample` is the clean x_0 (the name diffusers uses), not x_t.
        """
        check_samples(sample, "sample", noise, "noise")
        alpha_bar = self._gather(self.alphas_cumprod, timesteps, sample)
        return alpha_bar ** 0.5 * noise - (1 - alpha_bar) ** 0.5 * sample

    def predict_x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor):
        """x_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t): Ho eq. 4 solved for x_0 (DDIM eq. 12's "predicted x_0").

        Where ᾱ_t = 0 (zero terminal SNR) it uses ᾱ_t = ALPHA_BAR_FLOOR instead of dividing by zero."""
        check_samples(x_t, "x_t", eps, "eps")
        alpha_bar = self._gather(self._alphas_cumprod_floored, t, x_t)
        return (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5

    def predict_eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: int | torch.Tensor):
        """ε = (x_t - sqrt(ᾱ_t) x_0) / sqrt(1 - ᾱ_t): Ho eq. 4 solved for ε."""
        check_samples(x_t, "x_t", x0, "x0")
        alpha_bar = self._gather(self.alphas_cumprod, t, x_t)
        return (x_t - alpha_bar ** 0.5 * x0) / (1 - alpha_bar) ** 0.5

    def predict_x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: int | torch.Tensor):
        """x_0 = sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v  (a x_t - s v = a² x_0 + s² x_0)."""
        check_samples(x_t, "x_t", v, "v")
        alpha_bar = self._gather(self.alphas_cumprod, t, x_t)
        return alpha_bar ** 0.5 * x_t - (1 - alpha_bar) ** 0.5 * v

    def predict_eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: int | torch.Tensor):
        """ε = sqrt(1 - ᾱ_t) x_t + sqrt(ᾱ_t) v  (s x_t + a v = s² ε + a² ε)."""
        check_samples(x_t, "x_t", v, "v")
        alpha_bar = self._gather(self.alphas_cumprod, t, x_t)
        return (1 - alpha_bar) ** 0.5 * x_t + alpha_bar ** 0.5 * v

    def to_x0_and_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor, prediction_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whatever the network predicts, return (predicted x_0, predicted ε); samplers need both."""
        if torch.is_tensor(model_output) and torch.is_tensor(x_t) and model_output.shape != x_t.shape:
            raise ValueError(
                f"model_output must have the shape of the sample {tuple(x_t.shape)}, got "
                f"{tuple(model_output.shape)} (a model that also predicts a variance is not supported)"
            )
        check_samples(x_t, "x_t", model_output, "model_output")
        if prediction_type == "epsilon":
            return self.predict_x0_from_eps(x_t, model_output, t), model_output
        if prediction_type == "sample":
            return model_output, self.predict_eps_from_x0(x_t, model_output, t)
        if prediction_type == "v_prediction":
            return self.predict_x0_from_v(x_t, model_output, t), self.predict_eps_from_v(x_t, model_output, t)
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
