"""GAR: the generative action recognizer of REST (Sec. 3.2-3.3): BLIP + temporal adapters.

A ``transformers.BlipForConditionalGeneration`` captioner whose ViT sees each frame of a clip, with
:class:`rest_fast.nn.TemporalAdapter` s mixing the frames' patch tokens before chosen ViT layers; the per-frame
output tokens are averaged over time and the BLIP text decoder captions the clip.

The adapters are attached with forward pre-hooks on ``vision_model.encoder.layers[i]`` and stored in a separate
``temporal_adapters`` ``ModuleList``: BLIP's own state-dict keys are untouched, so HF checkpoints load as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rest_fast.errors import UserError
from rest_fast.generation.beam_search import beam_search
from rest_fast.models.blip_attention import set_blip_attention
from rest_fast.models.blip_decoder import BlipTextDecoder

GAR_CONFIG = "gar_config.json"
ADAPTER_WEIGHTS = "temporal_adapters.safetensors"


class GenerateOutput(NamedTuple):
    """``texts``: ``B·R`` captions without the prompt (``R`` = ``num_return_sequences``, best first per item);
    ``token_ids``: int64 ``[B·R, L]``, the full sequences exactly as HF ``generate`` returns them (decoder BOS +
    prompt + caption + EOS + filler); ``scores``: fp32 ``[B·R]`` (HF's ``sequences_scores`` for beam search)."""

    texts: list[str]
    token_ids: torch.Tensor
    scores: torch.Tensor


class LossOutput(NamedTuple):
    """``loss``: scalar, the mean of ``per_sample``; ``per_sample``: ``[B]``, each sample's mean label-smoothed
    cross-entropy over its caption tokens (EOS included)."""

    loss: torch.Tensor
    per_sample: torch.Tensor


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: through pinned memory and a non-blocking copy on CUDA (no host wait)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _AdapterHook:
    """Forward pre-hook of one ViT layer: runs ``model.temporal_adapters[slot]`` on the layer's input tokens.

    A small object rather than a closure so that ``copy.deepcopy`` / pickling of the model carry hooks that point
    at the *copied* model and its adapters.
    """

    def __init__(self, model: GARModel, slot: int) -> None:
        self.model = model
        self.slot = slot

    def __call__(self, module, args, kwargs):
        if self.model._checkpointing_now():  # the adapter runs inside the checkpointed layer (_CheckpointedLayer)
            return None
        if args:
            return (self.model._apply_adapter(self.slot, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.model._apply_adapter(self.slot, kwargs["hidden_states"])}


class _CheckpointedLayer:
    """``forward`` of one ViT layer (set on the instance): HF's forward, or — when the model checkpoints — the layer's
    temporal adapter and HF's forward together under ``torch.utils.checkpoint`` (non-reentrant), so backward recomputes
    both and neither keeps activations. The adapter's frame count is read at call time and bound into the recompute
    (backward runs outside ``encode``). A small object, not a closure, for the same reason as :class:`_AdapterHook`.
    """

    def __init__(self, model: GARModel, layer: nn.Module, slot: int | None) -> None:
        self.model = model
        self.layer = layer
        self.slot = slot

    def _run(self, frames: int, hidden_states: torch.Tensor, *args, **kwargs):
        if self.slot is not None:
            hidden_states = self.model._apply_adapter(self.slot, hidden_states, frames)
        return type(self.layer).forward(self.layer, hidden_states, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if not self.model._checkpointing_now():
            return type(self.layer).forward(self.layer, *args, **kwargs)
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self._run, self.model._frames, hidden, *args, use_reentrant=False, **kwargs)


def _resolve_layers(adapter_layers, num_layers: int) -> list[int]:
    if isinstance(adapter_layers, str):
        if adapter_layers != "all":
            raise UserError(f"adapter_layers must be 'all', a list of ViT layer indices or [], got {adapter_layers!r}")
        return list(range(num_layers))
    layers = sorted({int(i) for i in adapter_layers})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"adapter_layers {bad} out of range for a {num_layers}-layer ViT (layers 0-{num_layers - 1})")
    return layers


class GARModel(nn.Module):
    """BLIP captioner + temporal adapters.

    Args:
        blip: a ``transformers.BlipForConditionalGeneration``.
        tokenizer: its BERT WordPiece tokenizer (``[CLS] … [SEP]``; the decoder BOS is ``text_config.bos_token_id``).
        num_frames: ``T``, the frames per clip the adapters are built for.
        adapter_layers: ``"all"``, a list of ViT layer indices (an adapter runs *before* each listed layer), or
            ``[]`` for none.
        adapter_init_std: init std of the adapters' conv weights (``0.0`` = exact identity at init).
        attn_impl: attention arithmetic of our decoder, ``"sdpa"`` (fused, default) or ``"eager"`` (HF BLIP's
            matmul + softmax, op for op). Both give HF's tokens when logits are not tied to rounding noise.
        autocast: run ``encode`` / ``loss`` / ``generate`` under bf16 autocast on CUDA (default ``True``).
        compile_decoder: decode through ``torch.compile`` (see :class:`BlipTextDecoder`); off by default, its GPU
            speed is unmeasured.
        grad_checkpointing: recompute each ViT layer (its temporal adapter included) in backward instead of keeping
            its activations (:meth:`set_grad_checkpointing`).

    ``attn_impl`` also sets the attention of ``blip``'s own ViT and text modules (used by :meth:`encode` and
    :meth:`loss`): ``"sdpa"`` patches them in place to ``scaled_dot_product_attention``
    (:func:`rest_fast.models.blip_attention.set_blip_attention`; state-dict keys unchanged).
    """

    def __init__(self, blip, tokenizer, num_frames: int = 8, adapter_layers="all", *,
                 adapter_init_std: float | None = None, attn_impl: str = "sdpa", autocast: bool = True,
                 compile_decoder: bool = False, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.blip = blip
        self.tokenizer = tokenizer
        self.num_frames = int(num_frames)
        if attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {attn_impl!r}")
        self.attn_impl = attn_impl
        set_blip_attention(blip, attn_impl)
        self.autocast = bool(autocast)
        self.grad_checkpointing = False
        self.compile_decoder = bool(compile_decoder)
        vcfg = blip.config.vision_config
        self.adapter_layers = _resolve_layers(adapter_layers, vcfg.num_hidden_layers)
        self.temporal_adapters = nn.ModuleList()
        if self.adapter_layers:
            from rest_fast.nn import TemporalAdapter

            kw = {} if adapter_init_std is None else {"init_std": adapter_init_std}
            for _ in self.adapter_layers:
                self.temporal_adapters.append(TemporalAdapter(vcfg.hidden_size, self.num_frames, **kw))
            self.temporal_adapters.to(next(blip.parameters()).device)  # beside the ViT (fp32 master weights)
        self._frames = 1  # frames per clip of the batch the ViT is running; 1 outside `encode`
        self._hooks = []
        layers = blip.vision_model.encoder.layers
        for slot, li in enumerate(self.adapter_layers):
            self._hooks.append(layers[li].register_forward_pre_hook(_AdapterHook(self, slot), with_kwargs=True))
        slot_of = {li: slot for slot, li in enumerate(self.adapter_layers)}
        for li, layer in enumerate(layers):
            layer.forward = _CheckpointedLayer(self, layer, slot_of.get(li))
        self.set_grad_checkpointing(grad_checkpointing)
        tcfg = blip.config.text_config
        self.bos_token_id = tcfg.bos_token_id
        self.eos_token_id = tcfg.sep_token_id  # BLIP's generate stops on [SEP]
        self.pad_token_id = tcfg.pad_token_id

    # -- construction / persistence -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike, num_frames: int | None = None, adapter_layers=None,
                        **kwargs) -> GARModel:
        """Load from an HF hub id (e.g. ``Salesforce/blip-image-captioning-base``) or a local directory written by
        HF ``save_pretrained`` (model + processor/tokenizer) or by :meth:`save_pretrained`.

        ``num_frames`` / ``adapter_layers``: for a GAR directory, ``None`` means the saved values; for a plain BLIP
        checkpoint ``None`` means ``8`` / ``"all"`` (fresh adapters). Extra ``kwargs`` go to HF ``from_pretrained``.
        """
        from transformers import AutoTokenizer, BlipForConditionalGeneration

        path = Path(name_or_dir)
        saved = {}
        if (path / GAR_CONFIG).is_file():
            saved = json.loads((path / GAR_CONFIG).read_text())
        T = num_frames if num_frames is not None else saved.get("num_frames", 8)
        layers = adapter_layers if adapter_layers is not None else saved.get("adapter_layers", "all")
        blip = BlipForConditionalGeneration.from_pretrained(str(name_or_dir), **kwargs)
        blip.eval()
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir))
        model = cls(blip, tokenizer, num_frames=T, adapter_layers=layers,
                    adapter_init_std=saved.get("adapter_init_std"))
        if (path / ADAPTER_WEIGHTS).is_file():
            from safetensors.torch import load_file

            state = load_file(str(path / ADAPTER_WEIGHTS))
            if [int(i) for i in saved.get("adapter_layers", [])] == model.adapter_layers:
                model.temporal_adapters.load_state_dict(state)
            elif state:
                raise ValueError(f"{name_or_dir} holds adapters for ViT layers {saved.get('adapter_layers')}, "
                                 f"but adapter_layers={model.adapter_layers} was asked for")
        return model

    def save_pretrained(self, save_dir: str | os.PathLike) -> None:
        """Write BLIP (HF format: ``config.json`` + ``model.safetensors``), the tokenizer, the adapters
        (``temporal_adapters.safetensors``) and ``gar_config.json`` (``num_frames``, ``adapter_layers``)."""
        from safetensors.torch import save_file

        from rest_fast.atomic_io import apply_umask, new_files_follow_umask

        path = Path(save_dir)
        path.mkdir(parents=True, exist_ok=True)
        with new_files_follow_umask(path):  # safetensors writes its files 0600 whatever the umask
            self.blip.save_pretrained(str(path))
            self.tokenizer.save_pretrained(str(path))
        state = {k: v.detach().contiguous().cpu() for k, v in self.temporal_adapters.state_dict().items()}
        tmp = path / (ADAPTER_WEIGHTS + ".tmp")
        save_file(state, str(tmp))
        apply_umask(tmp)
        os.replace(tmp, path / ADAPTER_WEIGHTS)
        init_std = self.temporal_adapters[0].init_std if len(self.temporal_adapters) else None
        cfg = {"num_frames": self.num_frames, "adapter_layers": self.adapter_layers, "adapter_init_std": init_std}
        tmp = path / (GAR_CONFIG + ".tmp")
        tmp.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, path / GAR_CONFIG)

    # -- vision ---------------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing of the ViT layers (adapters included) while training with autograd on."""
        self.grad_checkpointing = bool(enabled)

    def _checkpointing_now(self) -> bool:
        return self.grad_checkpointing and self.training and torch.is_grad_enabled()

    def _apply_adapter(self, slot: int, x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        adapter = self.temporal_adapters[slot]
        T = self._frames if frames is None else frames
        if T == adapter.num_frames:
            return adapter(x)
        # The adapter's layout rule holds for any T; it reads T from `num_frames`.
        saved = adapter.num_frames
        adapter.num_frames = T
        try:
            return adapter(x)
        finally:
            adapter.num_frames = saved

    @contextmanager
    def _clip_frames(self, T: int):
        saved, self._frames = self._frames, T
        try:
            yield
        finally:
            self._frames = saved

    def _autocast(self, device: torch.device):
        if device.type == "cuda" and self.autocast:
            # bf16 by default; fp16 on cards without bf16 (the trainer's precision=fp16 sets autocast_dtype)
            return torch.autocast("cuda", dtype=getattr(self, "autocast_dtype", torch.bfloat16))
        return nullcontext()

    @staticmethod
    def _as_clips(videos: torch.Tensor) -> torch.Tensor:
        if videos.dim() == 4:  # [B, 3, S, S] images → one-frame clips
            videos = videos[:, None]
        if videos.dim() != 5 or videos.shape[2] != 3:
            raise ValueError(f"videos must be [B, T, 3, S, S] (or images [B, 3, S, S]), got {tuple(videos.shape)}")
        return videos

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        """``videos [B, T, 3, S, S]`` (or ``[B, 3, S, S]``) → image tokens ``[B, 1 + H·W, d]``.

        Per-frame ViT over the ``B·T`` frames, temporal adapters across ``T``, post-LayerNorm, then the mean over
        ``T`` of the CLS and patch tokens. Runs under bf16 autocast on CUDA.
        """
        videos = self._as_clips(videos)
        B, T = videos.shape[:2]
        frames = videos.reshape(B * T, *videos.shape[2:])
        # A frame size other than the checkpoint's (e.g. the paper's S=224 on the 384-px BLIP-base) needs the
        # position embeddings interpolated: without it HF slices them silently and the ViT sees wrong positions.
        native = self.blip.config.vision_config.image_size
        extra = {"interpolate_pos_encoding": True} if tuple(frames.shape[-2:]) != (native, native) else {}
        with self._clip_frames(T), self._autocast(frames.device):
            tokens = self.blip.vision_model(pixel_values=frames, **extra).last_hidden_state
        return tokens.view(B, T, *tokens.shape[1:]).mean(dim=1)

    # -- text -----------------------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The decoder prompt as BLIP's ``generate`` builds it: tokenize ``[CLS] prompt [SEP]``, replace ``[CLS]``
        by the decoder BOS, drop the trailing ``[SEP]``. int64 ``[P]``."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        ids = list(self.tokenizer(prompt.lower()).input_ids)
        ids[0] = self.bos_token_id
        return torch.tensor(ids[:-1], dtype=torch.int64, device=device)

    def loss(self, videos: torch.Tensor, captions: Sequence[str], *, prompt: str = "a video of",
             label_smoothing: float = 0.2, max_length: int = 40) -> LossOutput:
        """Eq. 2: label-smoothed cross-entropy of ``captions`` given the clips, on caption tokens only.

        The decoder input is ``[BOS] + prompt + caption + [SEP]`` (lower-cased, at most ``max_length`` tokens);
        targets are the caption tokens and the final ``[SEP]``; the prompt positions are not scored.
        """
        videos = self._as_clips(videos)
        if len(captions) != videos.shape[0]:
            raise ValueError(f"captions has {len(captions)} entries for {videos.shape[0]} videos")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        dev = videos.device
        tok = self.loss_tokens(captions, prompt=prompt, max_length=max_length)
        ids, mask, pos, targets, row, counts = (_to_device(t, dev) for t in tok)
        image = self.encode(videos)
        with self._autocast(dev):
            hidden = self.blip.text_decoder.bert(
                input_ids=ids, attention_mask=mask, encoder_hidden_states=image, is_decoder=True,
            ).last_hidden_state
            # The vocabulary projection only where a caption token is predicted: positions chosen on the host, so
            # no boolean-mask indexing (a device sync) happens here.
            flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            logits = self.blip.text_decoder.cls(flat.index_select(0, pos))
        ce = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=label_smoothing)
        per_sample = torch.zeros(ids.shape[0], dtype=ce.dtype, device=dev).index_add_(0, row, ce) / counts
        return LossOutput(per_sample.mean(), per_sample)

    def loss_tokens(self, captions: Sequence[str], *, prompt: str = "a video of", max_length: int = 40):
        """Host-side (CPU) inputs of :meth:`loss`, built without touching the device.

        Returns ``(ids int64 [B, L], mask int64 [B, L], pos int64 [M], targets int64 [M], row int64 [M],
        counts float32 [B])``: decoder input ids (BOS first) and attention mask; the flat indices into the
        ``[B, L-1]`` predicting positions that are scored (caption tokens and the final [SEP], never the prompt), their
        target token ids and rows; and each row's number of scored tokens. Raises ``ValueError`` when ``max_length``
        leaves some caption no token after the prompt.
        """
        import numpy as np  # host arithmetic in numpy: it never touches (or waits for) the device

        n_prompt = len(self.tokenizer(prompt.lower()).input_ids) - 1  # BOS + prompt tokens (see prompt_ids)
        texts = [f"{prompt} {c}".lower().strip() for c in captions]
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="np")
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        mask = np.asarray(enc["attention_mask"], dtype=np.int64)
        ids[:, 0] = self.bos_token_id
        scored = mask[:, 1:].astype(bool)
        scored[:, : n_prompt - 1] = False
        counts = scored.sum(1)
        if (counts == 0).any():
            raise ValueError(f"max_length={max_length} leaves no caption token after the prompt for some captions")
        pos = np.flatnonzero(scored)
        targets = ids[:, 1:].reshape(-1)[pos]
        row = pos // scored.shape[1]
        return tuple(torch.from_numpy(a) for a in (ids, mask, pos, targets, row, counts.astype(np.float32)))

    def forward(self, videos: torch.Tensor, captions: Sequence[str], **kwargs) -> LossOutput:
        """Same as :meth:`loss`."""
        return self.loss(videos, captions, **kwargs)

    # -- generation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, videos: torch.Tensor, *, prompt: str = "a video of", num_beams: int = 3, max_length: int = 20,
                 min_length: int = 5, repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                 num_return_sequences: int = 1) -> GenerateOutput:
        """Caption ``videos [B, T, 3, S, S]`` (or images ``[B, 3, S, S]``) with beam search (greedy if
        ``num_beams == 1``); token-identical to HF BLIP ``generate`` with the same arguments (see
        :mod:`rest_fast.generation.beam_search` for the conventions: lengths count BOS + prompt tokens)."""
        image = self.encode(videos)
        return self.decode(image, prompt=prompt, num_beams=num_beams, max_length=max_length, min_length=min_length,
                           repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                           num_return_sequences=num_return_sequences)

    @torch.no_grad()
    def decode(self, image_embeds: torch.Tensor, *, prompt: str = "a video of", num_beams: int = 3,
               max_length: int = 20, min_length: int = 5, repetition_penalty: float = 1.0,
               length_penalty: float = 1.0, num_return_sequences: int = 1) -> GenerateOutput:
        """Caption from encoder tokens ``image_embeds [B, N, d]`` (the output of :meth:`encode`)."""
        if image_embeds.dim() != 3:
            raise ValueError(f"image_embeds must be [B, N, d], got {tuple(image_embeds.shape)}")
        dev = image_embeds.device
        ids = self.prompt_ids(prompt, dev)
        input_ids = ids[None].expand(image_embeds.shape[0], -1).contiguous()
        decoder = BlipTextDecoder(self.blip.text_decoder, attn_impl=self.attn_impl,
                                  compile=self.compile_decoder)
        with self._autocast(dev):
            out = beam_search(decoder.session(image_embeds, max_length), input_ids, num_beams=num_beams,
                              max_length=max_length, min_length=min_length, eos_token_id=self.eos_token_id,
                              pad_token_id=self.pad_token_id, repetition_penalty=repetition_penalty,
                              length_penalty=length_penalty, num_return_sequences=num_return_sequences)
        texts = self.tokenizer.batch_decode(out.sequences[:, len(ids):].tolist(), skip_special_tokens=True)
        return GenerateOutput([t.strip() for t in texts], out.sequences, out.scores)

    @torch.no_grad()
    def generate_frames(self, frames: torch.Tensor, prompts: Sequence[str] = ("a video of",),
                        **kwargs) -> list[GenerateOutput]:
        """Caption single frames ``[N, 3, S, S]`` (or ``[N, 1, 3, S, S]``) once per prompt; the ViT runs once.

        Returns one :class:`GenerateOutput` per prompt (``kwargs`` as in :meth:`generate`).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        image = self.encode(frames)
        return [self.decode(image, prompt=p, **kwargs) for p in prompts]
