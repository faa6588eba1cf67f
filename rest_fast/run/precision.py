"""Training precision: ``precision: bf16 | fp16 | fp32`` (with ``amp`` as its alias) and the fp16 gradient scaler.

* ``bf16`` — bf16 autocast on CUDA (the default; Ampere and newer).
* ``fp16`` — fp16 autocast on CUDA for cards without bf16 (T4, V100, 2080 Ti): the loss is scaled by a
  :class:`torch.amp.GradScaler`, and an optimiser step whose gradients hold inf/NaN is skipped and counted
  (:class:`StepScaler`).
* ``fp32`` — no autocast; CLIP's weights in fp32 too.

On the CPU every precision computes in fp32 (autocast is CUDA-only here), so a run's config is the same
wherever it runs. ``amp`` stays a key: ``amp=true`` means mixed precision (bf16 unless fp16 was chosen),
``amp=false`` means fp32; giving both ``amp`` and ``precision`` so that they disagree is a one-line error.

The config half (:func:`reconcile_amp`) is torch-free: :mod:`rest_fast.run.config` imports it.
"""

from __future__ import annotations

from typing import Any

PRECISIONS = ("bf16", "fp16", "fp32")


class PrecisionError(ValueError):
    """A precision setting that cannot be honoured (a config contradiction, a card without bf16)."""


def normalise_precision(value: Any) -> str:
    """``value`` as one of :data:`PRECISIONS` (case and a few spellings forgiven), else :class:`PrecisionError`."""
    v = str(value).strip().lower()
    v = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(v, v)
    if v not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}; got {value!r}")
    return v


def amp_of(precision: str) -> bool:
    """The ``amp`` value a precision stands for: mixed precision on (bf16, fp16) or off (fp32)."""
    return normalise_precision(precision) != "fp32"


def reconcile_amp(values: dict, given: set[str]) -> None:
    """Make ``values["amp"]`` and ``values["precision"]`` agree, in place, from the keys of one config layer
    (``given``: the keys that layer sets).

    Only ``amp`` given: ``false`` → fp32; ``true`` → bf16 unless the precision already was a mixed one (fp16
    stays fp16). Only ``precision`` given: ``amp`` follows it. Both given and contradicting: :class:`PrecisionError`.
    """
    if "precision" in given:
        values["precision"] = normalise_precision(values["precision"])
    if "precision" in given and "amp" in given:
        if bool(values["amp"]) != amp_of(values["precision"]):
            raise PrecisionError(f"amp={str(bool(values['amp'])).lower()} contradicts precision={values['precision']} "
                                 "(amp is precision's alias: true = bf16 or fp16, false = fp32); give one of them")
    elif "precision" in given:
        values["amp"] = amp_of(values["precision"])
    elif "amp" in given:
        prev = normalise_precision(values.get("precision", "bf16"))
        values["precision"] = ("fp16" if prev == "fp16" else "bf16") if values["amp"] else "fp32"


def check_config_precision(amp: bool, precision: str) -> str:
    """The precision a directly constructed config means (``TrainConfig(amp=False)`` → fp32); raises on
    ``amp=false`` with ``precision=fp16`` (both were chosen, and they disagree)."""
    p = normalise_precision(precision)
    if not amp and p == "fp16":
        raise PrecisionError("amp=false contradicts precision=fp16 (amp is precision's alias: false = fp32); give one of them")
    return "fp32" if not amp else p


# --------------------------------------------------------------------------------------------------
# torch side
# --------------------------------------------------------------------------------------------------


def autocast_dtype(precision: str | bool | None):
    """The CUDA autocast dtype of a precision (``True`` = bf16, the old ``amp`` flag), or ``None`` for fp32."""
    import torch

    if precision is True:
        return torch.bfloat16
    if precision in (False, None):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[normalise_precision(precision)]


def check_device_precision(device, precision: str) -> None:
    """Refuse bf16 on a CUDA card that has no bf16 units (one line naming fp16 as the way out)."""
    import torch

    if torch.device(device).type != "cuda" or normalise_precision(precision) != "bf16":
        return
    try:
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no including_emulation
        ok = torch.cuda.is_bf16_supported()
    if not ok:
        name = torch.cuda.get_device_name(torch.device(device))
        raise PrecisionError(f"precision=bf16: {name} has no bf16 support; use precision=fp16 (with a gradient "
                             "scaler) or precision=fp32")


class StepScaler:
    """The optimiser-step side of a precision: a :class:`torch.amp.GradScaler` for fp16, a pass-through otherwise.

    ``scale(loss)`` before ``backward``; ``step(optimizer, params, grad_clip)`` unscales (fp16), clips, steps —
    skipping the step when a gradient is inf/NaN (fp16 only: the scaler's own check, no host sync) — and
    updates the scale. ``skipped`` is a device counter of the skipped steps (read it when logging).
    """

    def __init__(self, precision: str, device, *, enabled: bool | None = None, init_scale: float = 2.0 ** 16) -> None:
        import torch

        self.device = torch.device(device)
        use = normalise_precision(precision) == "fp16" and self.device.type == "cuda"
        self.enabled = use if enabled is None else bool(enabled)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=init_scale, enabled=self.enabled)
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device if self.enabled else "cpu")

    def scale(self, loss):
        return self.scaler.scale(loss) if self.enabled else loss

    def step(self, optimizer, params, grad_clip: float = 0.0) -> None:
        import torch

        if not self.enabled:
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)  # foreach on CUDA; no sync
            optimizer.step()
            return
        if grad_clip > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        before = self.scaler._scale.clone() if self.scaler._scale is not None else None
        self.scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/NaN
        self.scaler.update()  # ... and then the scale shrinks: that is how a skip is counted without a sync
        if before is not None:
            self.skipped += (self.scaler._scale < before).to(torch.int64)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.enabled else {}, "skipped": int(self.skipped.item())}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped.fill_(int(state.get("skipped", 0)))
