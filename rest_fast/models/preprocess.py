"""Pixel normalisation of a BLIP checkpoint, shared by the trainer and the evaluator."""

from __future__ import annotations

from pathlib import Path


def blip_normalisation(source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """BLIP's pixel mean/std: from the checkpoint's image-processor config when it has one, else the
    BlipImageProcessor defaults (the OpenAI CLIP constants, which every released BLIP uses)."""
    from rest_fast.clip import OPENAI_MEAN, OPENAI_STD

    cfg = Path(source) / "preprocessor_config.json"
    if cfg.is_file():
        import json

        d = json.loads(cfg.read_text())
        if "image_mean" in d and "image_std" in d:
            return tuple(d["image_mean"]), tuple(d["image_std"])
    if not Path(source).exists():  # a hub id: ask HF (cached locally when it was downloaded)
        try:
            from transformers import BlipImageProcessor

            proc = BlipImageProcessor.from_pretrained(source)
            return tuple(proc.image_mean), tuple(proc.image_std)
        except Exception:  # noqa: BLE001 - no processor file: the defaults below are BLIP's own
            pass
    return tuple(OPENAI_MEAN), tuple(OPENAI_STD)


def check_image_size(image_size: int, patch_size: int, native: int) -> None:
    """Refuse frames smaller than one ViT patch of the captioner (its patch embedding would see nothing):
    one line (:class:`~rest_fast.errors.UserError`) instead of a convolution error on every video."""
    from rest_fast.errors import UserError

    if image_size < patch_size:
        raise UserError(f"image_size={image_size} is smaller than the captioner's {patch_size}-pixel patches: use at "
                        f"least {patch_size} (the model was trained at {native})")
