"""Batched beam search and greedy search that reproduce HF ``generate`` token for token, with less work per step.

The search talks to the model through a small :class:`Decoder` protocol (prefill the prompt once per batch item, then
one step per token with a row index that reorders / drops cached rows), so it knows nothing about BLIP.

HF conventions reproduced (``transformers`` 5.x ``GenerationMixin._beam_search`` / ``_sample``, default
``early_stopping=False``), with ``P`` the prompt length in tokens:

* Lengths count the prompt: ``max_length`` is the total sequence length (prompt + generated), and EOS is
  forbidden (``-inf``) while the sequence is shorter than ``min_length`` tokens, prompt included.
* Beam search scores ``log_softmax(logits)`` (fp32); logits processors act on the log-probs, in HF's order:
  repetition penalty (every token id present in the sequence, prompt included, once: ``x·p`` if ``x < 0`` else
  ``x / p``), then the min-length EOS ban. Greedy search applies the same processors to the raw logits, then argmax.
* Step 0 runs every beam on the same prompt; beams ``1..K-1`` start at ``-1e9`` so only beam 0's continuations are
  candidates. Each step keeps the top ``2K`` candidates (``K`` = beams); those that end in EOS or reach
  ``max_length`` are "finished": they are penalised by ``-1e9`` for the running set (the top ``K`` of the rest
  continue) and, if among the top ``K`` candidates, enter the finished set with score
  ``sum_logprob / generated_len ** length_penalty`` (``generated_len`` counts EOS). The finished set keeps its best
  ``K`` (``torch.topk`` over ``[old finished, new candidates]``).
* A batch item is done once all ``K`` finished slots are filled and the best running beam, scored at the current
  generated length, cannot beat the worst finished one (HF's ``early_stopping=False`` heuristic). The search ends
  when every item is done or ``max_length`` is reached.
* Output: the best ``num_return_sequences`` finished hypotheses per item (prompt included), cut to
  ``P + the longest returned generated length``; positions after a hypothesis' EOS hold
  ``pad_token_id or eos_token_id`` (HF's fill value: BLIP's pad id is 0, so this is the EOS id). Greedy rows
  that finished early are filled with ``pad_token_id``.

What is faster than HF, without changing a result:

* A batch item that is done (its finished set can no longer change) is dropped from the batch: its decoder rows
  leave the KV cache via the same row index that reorders beams; greedy drops finished rows likewise.
* The decoder prefills the prompt once per item (not once per beam) and shares per-item encoder state across
  beams (see :class:`rest_fast.models.blip_decoder.BlipTextDecoder`).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

NEG = -1.0e9  # HF's "impossible" score offset (a finite number: sums stay finite and ordered)


class Decoder(Protocol):
    """What the search needs from a model (all logits ``[rows, vocab]``, any float dtype).

    ``start(input_ids [B, P], num_beams)``: run the prompt once per item; return the logits at its last position,
    ``[B, V]``; afterwards the decoder holds ``B * num_beams`` identical rows (beam-major within an item).

    ``step(tokens [N], rows [N] | None, items [B'] | None)``: first make new row ``i`` = old row ``rows[i]``
    (``None``: keep rows as they are), keep only the batch items ``items`` (indices into the current items; ``None``:
    all), then feed one token per row and return the next-token logits ``[N, V]``.
    """

    def start(self, input_ids: torch.Tensor, num_beams: int) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor, rows: torch.Tensor | None, items: torch.Tensor | None) -> torch.Tensor: ...


class SearchOutput(NamedTuple):
    """``sequences``: int64 ``[B * R, L]`` (prompt included); ``scores``: fp32 ``[B * R]``; ``lengths``: int64
    ``[B * R]``, generated tokens per sequence (EOS included). ``R`` = ``num_return_sequences``."""

    sequences: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor


def _check(input_ids: torch.Tensor, num_beams: int, max_length: int, min_length: int, repetition_penalty: float,
           num_return_sequences: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt_len] with both >= 1, got {tuple(input_ids.shape)}")
    if input_ids.dtype != torch.int64:
        raise ValueError(f"input_ids must be int64, got {input_ids.dtype}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if max_length <= input_ids.shape[1]:
        raise ValueError(f"max_length ({max_length}) must exceed the prompt length ({input_ids.shape[1]} tokens): "
                         "lengths count the prompt")
    if min_length < 0:
        raise ValueError(f"min_length must be >= 0, got {min_length}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be in 1..num_beams ({num_beams})")


def _process(scores: torch.Tensor, seqs: torch.Tensor, cur_len: int, *, eos_token_id: int, min_length: int,
             repetition_penalty: float) -> torch.Tensor:
    """HF's logits processors, in HF's order: repetition penalty over ``seqs [N, cur_len]``, then min length."""
    if repetition_penalty != 1.0:
        g = scores.gather(1, seqs)
        g = torch.where(g < 0, g * repetition_penalty, g / repetition_penalty)
        scores = scores.scatter(1, seqs, g)
    if cur_len < min_length:
        scores = scores.clone()
        scores[:, eos_token_id] = -float("inf")
    return scores


@torch.no_grad()
def beam_search(decoder: Decoder, input_ids: torch.Tensor, *, num_beams: int = 3, max_length: int = 20,
                min_length: int = 0, eos_token_id: int, pad_token_id: int | None = None,
                repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                num_return_sequences: int = 1) -> SearchOutput:
    """Beam search (greedy when ``num_beams == 1``) with HF ``generate``'s exact semantics (module docstring).

    Args:
        decoder: a :class:`Decoder`.
        input_ids: int64 ``[B, P]``, the prompt of each item (no padding: every row has ``P`` real tokens).
        num_beams, max_length, min_length, repetition_penalty, length_penalty, num_return_sequences: as in HF;
            lengths count the prompt.
        eos_token_id: the id that ends a sequence (BLIP: ``[SEP]``).
        pad_token_id: filler after EOS (see the module docstring for HF's rule).

    Returns:
        :class:`SearchOutput`. Greedy scores are ``sum log_softmax(processed logits)[token] / len ** length_penalty``
        over the generated tokens (HF returns none); beam scores are HF's ``sequences_scores``.
    """
    _check(input_ids, num_beams, max_length, min_length, repetition_penalty, num_return_sequences)
    if num_beams == 1:
        return _greedy(decoder, input_ids, max_length=max_length, min_length=min_length, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, repetition_penalty=repetition_penalty,
                       length_penalty=length_penalty)
    dev = input_ids.device
    B, P = input_ids.shape
    K, K2 = num_beams, 2 * num_beams
    fill = pad_token_id or eos_token_id  # HF: `pad_token_id or eos_token_id[0]` (a pad id of 0 is falsy)

    running = torch.full((B, K, max_length), fill, dtype=torch.int64, device=dev)
    running[:, :, :P] = input_ids[:, None, :]
    run_scores = torch.zeros((B, K), dtype=torch.float32, device=dev)
    run_scores[:, 1:] = NEG
    fin_seq = running.clone()
    fin_scores = torch.full((B, K), NEG, dtype=torch.float32, device=dev)
    fin_len = torch.zeros((B, K), dtype=torch.int64, device=dev)
    fin_done = torch.zeros((B, K), dtype=torch.bool, device=dev)
    heur = torch.ones((B,), dtype=torch.bool, device=dev)  # HF's is_early_stop_heuristic_unsatisfied
    top_k_mask = torch.arange(K2, device=dev) < K
    # Results of items whose search is over, indexed by the original item.
    out_seq = torch.full((B, K, max_length), fill, dtype=torch.int64, device=dev)
    out_scores = torch.full((B, K), NEG, dtype=torch.float32, device=dev)
    out_len = torch.zeros((B, K), dtype=torch.int64, device=dev)
    active = torch.arange(B, device=dev)  # original index of each item still searched

    logits = decoder.start(input_ids, K)  # [B, V]: every beam of an item holds the same prompt
    V = logits.shape[-1]
    logits = logits.float()[:, None, :].expand(B, K, V).reshape(B * K, V)
    cur_len = P
    while True:
        nb = active.shape[0]
        logp = F.log_softmax(logits.float(), dim=-1)
        logp = _process(logp, running[:, :, :cur_len].reshape(nb * K, cur_len), cur_len, eos_token_id=eos_token_id,
                        min_length=min_length, repetition_penalty=repetition_penalty)
        logp = (logp.view(nb, K, V) + run_scores[:, :, None]).view(nb, K * V)

        # The top 2K continuations over all beams of an item.
        top_lp, top_idx = torch.topk(logp, K2)
        src_beam = top_idx // V
        tok = top_idx % V
        cand = torch.take_along_dim(running, src_beam[:, :, None], dim=1)
        cand[:, :, cur_len] = tok
        cand_row = src_beam + torch.arange(nb, device=dev)[:, None] * K  # decoder row each candidate extends
        hits = tok == eos_token_id
        if cur_len + 1 >= max_length:
            hits = torch.ones_like(hits)

        # Running beams for the next step: the best K candidates that did not finish.
        run_lp = top_lp + hits.to(torch.float32) * NEG
        nxt = torch.topk(run_lp, K)[1]
        running = torch.take_along_dim(cand, nxt[:, :, None], dim=1)
        run_scores = torch.take_along_dim(run_lp, nxt, dim=1)
        rows = torch.take_along_dim(cand_row, nxt, dim=1)

        # Finished set: merge the top-K candidates that just finished (HF's arithmetic, op for op).
        just = hits & top_k_mask[None, :]
        sc = top_lp / ((cur_len + 1 - P) ** length_penalty)
        sc = sc + (~heur)[:, None].to(torch.float32) * NEG
        sc = sc + (~just) * NEG
        m_idx = torch.topk(torch.cat((fin_scores, sc), dim=1), K)[1]
        fin_seq = torch.take_along_dim(torch.cat((fin_seq, cand), dim=1), m_idx[:, :, None], dim=1)
        fin_scores = torch.take_along_dim(torch.cat((fin_scores, sc), dim=1), m_idx, dim=1)
        new_len = torch.full((nb, K2), cur_len + 1 - P, dtype=torch.int64, device=dev)
        fin_len = torch.take_along_dim(torch.cat((fin_len, new_len), dim=1), m_idx, dim=1)
        fin_done = torch.take_along_dim(torch.cat((fin_done, just), dim=1), m_idx, dim=1)

        cur_len += 1
        best_running = run_scores[:, :1] / ((cur_len - P) ** length_penalty)
        worst_finished = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True)[0], NEG)
        heur = heur & (best_running > worst_finished).any(dim=1)

        # Items whose finished set can no longer change are done: store them and drop their rows.
        last = cur_len >= max_length
        done = torch.ones_like(heur) if last else ~heur
        if bool(done.any()):
            ids = active[done]
            out_seq[ids] = fin_seq[done]
            out_scores[ids] = fin_scores[done]
            out_len[ids] = fin_len[done]
            if last or bool(done.all()):
                break
            keep = (~done).nonzero().squeeze(1)
            active = active[keep]
            running, run_scores, rows = running[keep], run_scores[keep], rows[keep]
            fin_seq, fin_scores, fin_len, fin_done = fin_seq[keep], fin_scores[keep], fin_len[keep], fin_done[keep]
            heur = heur[keep]
            items = keep
        else:
            items = None
        logits = decoder.step(running[:, :, cur_len - 1].reshape(-1), rows.reshape(-1), items)

    R = num_return_sequences
    lengths = out_len[:, :R].reshape(-1)
    total = P + int(lengths.max())
    return SearchOutput(out_seq[:, :R, :total].reshape(B * R, total), out_scores[:, :R].reshape(-1), lengths)


def _greedy(decoder: Decoder, input_ids: torch.Tensor, *, max_length: int, min_length: int, eos_token_id: int,
            pad_token_id: int | None, repetition_penalty: float, length_penalty: float) -> SearchOutput:
    """HF ``_sample`` without sampling: argmax of the processed logits; finished rows leave the batch."""
    dev = input_ids.device
    B, P = input_ids.shape
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    seqs = torch.full((B, max_length), pad, dtype=torch.int64, device=dev)
    seqs[:, :P] = input_ids
    logp_sum = torch.zeros(B, dtype=torch.float32, device=dev)
    lengths = torch.zeros(B, dtype=torch.int64, device=dev)
    active = torch.arange(B, device=dev)
    logits = decoder.start(input_ids, 1)
    cur_len = P
    while True:
        scores = _process(logits.float(), seqs[active, :cur_len], cur_len, eos_token_id=eos_token_id,
                          min_length=min_length, repetition_penalty=repetition_penalty)
        tok = torch.argmax(scores, dim=-1)
        logp_sum[active] += F.log_softmax(scores, dim=-1).gather(1, tok[:, None]).squeeze(1)
        seqs[active, cur_len] = tok
        cur_len += 1
        lengths[active] += 1
        finished = tok == eos_token_id
        if cur_len >= max_length or bool(finished.all()):
            break
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)
            active, tok = active[keep], tok[keep]
            logits = decoder.step(tok, keep, keep)
        else:
            logits = decoder.step(tok, None, None)
    total = P + int(lengths.max())
    scores = logp_sum / lengths.to(torch.float32) ** length_penalty
    return SearchOutput(seqs[:, :total], scores, lengths)
