"""Mixed precision: autocast over fp32 master weights, and dynamic loss scaling for fp16."""

import contextlib

import torch


def autocast_dtype(bf16: bool, fp16: bool) -> torch.dtype | None:
    """The autocast dtype for the precision flags (None: plain fp32)."""
    if bf16 and fp16:
        raise ValueError("--bf16 and --fp16 are mutually exclusive")
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for the forward pass; parameters stay fp32, so the optimizer updates fp32 masters."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossScaler:
    """Scales the loss before backward and unscales the gradients after: dynamic, static, or 1 (a no-op)."""

    def __init__(self, initial_scale: float = 1.0, dynamic: bool = False, min_scale: float = 1.0,
                 window: int = 1000, hysteresis: int = 2):
        self.scale = float(initial_scale)
        self.dynamic = dynamic
        self.min_scale = float(min_scale)
        self.window = window
        self.hysteresis = hysteresis
        self.good_steps = 0
        self.overflows_left = hysteresis

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on."""
        return loss * self.scale if self.scale != 1.0 else loss

    def unscale_(self, params: list[torch.Tensor]) -> None:
        """Divides the gradients by the scale, in place."""
        if self.scale != 1.0:
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """Adjusts a dynamic scale after a step that did (found_inf) or did not overflow."""
        # As Megatron: after `hysteresis` overflows the scale halves, then halves on every further overflow
        # until `window` finite steps in a row double it again.
        if not self.dynamic:
            return
        if found_inf:
            self.good_steps = 0
            self.overflows_left -= 1
            if self.overflows_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
        else:
            self.good_steps += 1
            if self.good_steps >= self.window:
                self.scale *= 2.0
                self.good_steps = 0
                self.overflows_left = self.hysteresis

    def state_dict(self) -> dict:
        """Everything needed to continue scaling after a resume."""
        return {"scale": self.scale, "good_steps": self.good_steps, "overflows_left": self.overflows_left}

    def load_state_dict(self, state: dict) -> None:
        """Restores state_dict()'s output."""
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.overflows_left = int(state["overflows_left"])


def build_loss_scaler(fp16: bool, loss_scale: float | None, initial_scale: float, min_scale: float,
                      window: int, hysteresis: int) -> LossScaler:
    """The scaler for the precision flags: dynamic or static for fp16, identity otherwise."""
    if not fp16:
        return LossScaler()
    if loss_scale is not None:
        return LossScaler(loss_scale)
    return LossScaler(initial_scale, dynamic=True, min_scale=min_scale, window=window, hysteresis=hysteresis)
