"""A few-step sigma list as a stock diffusers scheduler config.

Stock pipelines (WanPipeline, WanImageToVideoPipeline) call
`scheduler.set_timesteps(N)` and pass no sigmas. FlowMatchEulerDiscreteScheduler
then takes N points evenly spaced from 1 to its smallest training sigma, warps
them with `shift`, and, when `shift_terminal` is set, stretches them so that the
last one lands on it:

    u_i  = linspace(1, sigma_min(shift), N)          sigma_min(s) = s m / (1 + (s - 1) m), m = 1/T
    w_i  = shift u_i / (1 + (shift - 1) u_i)
    s_i  = 1 - (1 - w_i) (1 - shift_terminal) / (1 - w_{N-1})

So a list that starts at 1 has its end fixed by `shift_terminal` and its
interior by `shift` alone: one unknown, found on the second sigma (a scan of a
log grid for sign changes, then bisection), then checked on every point. `stochastic_sampling=True` makes `step` the few-step
sampler's own: predict x0, re-noise to the next sigma with fresh noise; False
(a deterministic student sampler) is the plain Euler step of the flow ODE.
"""

import math
from typing import Dict, List, Optional

TOLERANCE = 1e-5  # largest |sigma| difference accepted: the timesteps the network sees differ by < 0.01


def stretched_sigmas(num_steps: int, shift: float, shift_terminal: Optional[float],
                     train_steps: int = 1000, grid: str = "train_min") -> List[float]:
    """The sigmas `set_timesteps(num_steps)` gives for this shift and terminal (the formula
    above); with grid inverse_steps, those of `set_timesteps(sigmas=linspace(1, 1/N, N))`,
    which QwenImagePipeline passes (u_i = 1 - i/N in place of the first line)."""
    m = 1.0 / train_steps
    sigma_min = shift * m / (1 + (shift - 1) * m)
    if grid == "inverse_steps":
        u = [1.0 - i / num_steps for i in range(num_steps)]
    else:
        u = [1.0 + (sigma_min - 1.0) * i / (num_steps - 1) for i in range(num_steps)] if num_steps > 1 else [1.0]
    w = [shift * x / (1 + (shift - 1) * x) for x in u]
    if not shift_terminal:
        return w
    scale = (1 - w[-1]) / (1 - shift_terminal)
    return [1 - (1 - x) / scale for x in w]


def fit(sigmas: List[float], train_steps: int = 1000, grid: str = "train_min") -> Optional[Dict[str, float]]:
    """{'shift', 'shift_terminal'} whose `set_timesteps(len(sigmas))` gives `sigmas`
    within TOLERANCE, or None when no such pair exists."""
    n = len(sigmas)
    if n == 0 or abs(sigmas[0] - 1.0) > TOLERANCE or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        return None
    if n == 1:
        return {"shift": 1.0, "shift_terminal": None}
    terminal = float(sigmas[-1])
    if not 0 < terminal < 1:
        return None
    for shift in [1.0] if n == 2 else _shifts_through(sigmas[1], n, terminal, train_steps, grid):
        got = stretched_sigmas(n, shift, terminal, train_steps, grid)
        if max(abs(a - b) for a, b in zip(got, sigmas)) <= TOLERANCE:
            return {"shift": shift, "shift_terminal": terminal}
    return None


def _shifts_through(target: float, n: int, terminal: float, train_steps: int, grid: str) -> List[float]:
    """Every shift in [1e-3, 1e3] that puts the second sigma on `target`. The second
    sigma is not monotone in the shift over that whole range (a large shift raises
    sigma_min too), so scan a log grid for sign changes and bisect each."""
    second = lambda log_s: stretched_sigmas(n, math.exp(log_s), terminal, train_steps, grid)[1] - target
    grid = [math.log(1e-3) + i * math.log(1e6) / 600 for i in range(601)]
    found = []
    for lo, hi in zip(grid, grid[1:]):
        f_lo, f_hi = second(lo), second(hi)
        if f_lo == 0:
            found.append(math.exp(lo))
        elif f_lo * f_hi < 0:
            for _ in range(100):
                mid = (lo + hi) / 2
                f_mid = second(mid)
                if (f_mid < 0) == (f_lo < 0):
                    lo, f_lo = mid, f_mid
                else:
                    hi = mid
            found.append(math.exp((lo + hi) / 2))
    return found


def scheduler_config(sigmas: List[float], train_steps: int = 1000, stochastic: bool = True,
                     grid: str = "train_min") -> Optional[Dict]:
    """The FlowMatchEulerDiscreteScheduler config that samples `sigmas` from the pipeline's
    `set_timesteps` call (see `stretched_sigmas`), or None when the list is not representable."""
    fitted = fit(sigmas, train_steps, grid)
    if fitted is None:
        return None
    return {"num_train_timesteps": train_steps, "shift": fitted["shift"], "shift_terminal": fitted["shift_terminal"],
            "use_dynamic_shifting": False, "stochastic_sampling": stochastic}


def override_snippet(sigmas: List[float], stochastic: bool = True) -> str:
    """The lines that make a stock pipeline sample a list the config cannot hold: its
    `set_timesteps` given the sigmas, under shift 1 (which leaves them as they are)."""
    listed = ", ".join(f"{s:.6g}" for s in sigmas)
    return ("from functools import partial; from diffusers import FlowMatchEulerDiscreteScheduler\n"
            f"pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling={stochastic})\n"
            f"pipe.scheduler.set_timesteps = partial(pipe.scheduler.set_timesteps, sigmas=[{listed}])")
