"""Algorithm 1, initial captions W̃_i: the pretrained BLIP on each of the T frames with each prompt.

Every frame is captioned on its own (a batch of 1-frame clips; the temporal adapters start near the
identity, so this is essentially the pretrained image captioner the paper starts from) once per
prompt, giving T×P captions per video.
All of them enter the first retrieval update as extra candidates (see
:mod:`rest_fast.train.retrieval_update`).

Prompt handling: ``GARModel.generate`` returns the text after the prompt. A caption made with the
training prompt ("a video of") is kept without it, like every later generated caption, because
training and decoding add that prompt back. A caption made with another prompt keeps its prompt
("a person is" + "dancing" → "a person is dancing"): without it the continuation is a fragment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from rest_fast.train.distributed import DistEnv, autocast, gather_list


def join_prompt(prompt: str, text: str, train_prompt: str) -> str:
    """The caption text stored for an initial caption (see the module docstring)."""
    text = text.strip()
    if prompt.strip().lower() == train_prompt.strip().lower():
        return text
    return f"{prompt.strip()} {text}".strip()


@torch.no_grad()
def initial_captions(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], prompts: list[str], env: DistEnv, *,
                     train_prompt: str, num_beams: int, max_length: int, min_length: int, amp: bool = True,
                     progress: Callable | None = None) -> list[list[str]]:
    """T×P initial captions per video, gathered from all ranks in global video order.

    Args:
        model: a ``GARModel`` (any T: each frame is captioned as a 1-frame clip).
        batches: this rank's ``(video_indices int64 [B], clips float [B,T,3,S,S])`` in BLIP's normalisation,
            covering its shard in order.
        prompts: the P prompts.
    Returns:
        ``captions[i]`` = the T×P captions of video i, ordered frame-major (frame 0 with each prompt, frame 1, ...).
    """
    model.eval()
    local: list[list[str]] = []
    for _, clips in (progress(batches) if progress else batches):
        b, t = clips.shape[:2]
        frames = clips.to(env.device, non_blocking=True).reshape(b * t, 1, *clips.shape[2:])
        # the ViT runs once per frame; the decoder once per prompt
        with autocast(env.device, amp):
            outs = model.generate_frames(frames, list(prompts), num_beams=num_beams, max_length=max_length,
                                         min_length=min_length)
        per_prompt = [[join_prompt(p, s, train_prompt) for s in out.texts] for p, out in zip(prompts, outs)]
        for v in range(b):
            local.append([per_prompt[j][v * t + f] for f in range(t) for j in range(len(prompts))])
    return gather_list(env, local)

