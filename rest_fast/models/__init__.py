"""The captioner: :class:`GARModel` (BLIP + temporal adapters) and a tiny offline BLIP for tests and demos."""

from rest_fast.models.gar import GARModel, GenerateOutput, LossOutput
from rest_fast.models.tiny import tiny_blip, tiny_tokenizer

__all__ = ["GARModel", "GenerateOutput", "LossOutput", "tiny_blip", "tiny_tokenizer"]
