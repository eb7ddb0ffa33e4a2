"""What the transformer's output means, shared by every sampler and trainer.

Flow matching (SD3): ``x_t = (1 - sigma) * x0 + sigma * noise`` and the velocity is ``noise - x0``.
The official DiT4SR predicts that velocity (``prediction_type="flow"``). Small models trained from
scratch learn far better predicting x0 directly (``"sample"``), optionally as a residual over the LR
latent (``lr_residual``). Both are model configuration, so one pipeline serves every model.
"""

from __future__ import annotations

import torch

# Velocities are recovered from x0 predictions by dividing by sigma; below this the step is tiny anyway.
MIN_SIGMA = 1e-4


def check_parameterization(prediction_type: str, lr_residual: bool) -> None:
    if prediction_type not in ("flow", "sample"):
        raise ValueError(f"prediction_type must be 'flow' or 'sample', got {prediction_type!r}")
    if lr_residual and prediction_type != "sample":
        raise ValueError("lr_residual needs prediction_type='sample' (a residual is defined on x0)")


def _expand(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def predicted_x0(
    model_output: torch.Tensor,
    noisy: torch.Tensor,
    lr_latents: torch.Tensor,
    sigma: torch.Tensor | float,
    prediction_type: str,
    lr_residual: bool,
) -> torch.Tensor:
    """The clean latent implied by the network output at noise level ``sigma`` (scalar or per batch item)."""
    if prediction_type == "flow":
        return noisy - _expand(sigma, noisy) * model_output
    return lr_latents + model_output if lr_residual else model_output


def predicted_velocity(
    model_output: torch.Tensor,
    noisy: torch.Tensor,
    lr_latents: torch.Tensor,
    sigma: torch.Tensor | float,
    prediction_type: str,
    lr_residual: bool,
) -> torch.Tensor:
    """The flow-matching velocity ``noise - x0`` that Euler schedulers step with."""
    if prediction_type == "flow":
        return model_output
    x0 = predicted_x0(model_output, noisy, lr_latents, sigma, prediction_type, lr_residual)
    return (noisy - x0) / _expand(sigma, noisy).clamp_min(MIN_SIGMA)
