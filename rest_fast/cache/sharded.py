"""The caption cache sharded over ``torch.distributed`` ranks: no rank holds every caption string (issue 20).

What each of the P ranks holds (N videos, K slots, C captions):

* **Caption strings, by id:** the text of caption ``c`` lives on rank ``c mod P`` only (its *id owner*), at local row
  ``c // P`` — the rule of the sharded caption features (``CaptionFeatures``), so a rank embeds exactly the captions
  whose texts it holds. About ``C / P`` strings per rank.
* **The text → id dictionary, by hash:** a text's id is looked up on rank ``crc32(text) mod P`` (its *hash owner*),
  so every distinct text has one id on every world size. Another ``C / P`` strings per rank.
* **Slot ids, replicated:** int32 ``[N, K + 1]`` (the K slots and the pending caption of every video), 16 bytes a
  video at K = 3: 160 MB at 10M videos. Every rank needs them anyway — the re-rank of its N/P videos reads the slots
  of their H neighbours, which cover nearly all N videos once ``H ≥ P`` (H = 2,000), so fetching them per round
  would move at least as many bytes as holding them — and training samples its captions from them with no
  exchange.
* **Slot scores of its own videos** (``video_block``): float32 ``[N/P, K]``.

Ids are global, dense and **independent of P**: new captions get ids in order of their first appearance in the
global input order (the order of ``CaptionCache.intern`` on the concatenated list in one process). :meth:`intern` is
collective: texts travel to their hash owners with their global positions, each owner finds its new texts and their
first positions, the owners OR one bitmap over the positions (an ``all_reduce`` sum of disjoint bits), and a new
text's id is the number of new texts that appear before it. Same ids as one process, so the re-rank breaks ties
the same way on every world size, and the caption-feature files re-shard by id alone.

Collective calls (every rank calls them together, with its own inputs): :meth:`intern`, :meth:`texts_of`,
:meth:`sample_texts`, :meth:`set_own`, :meth:`add_pending_own`, :meth:`save`, :meth:`load`. Local calls:
``len``, :meth:`texts` (ids this rank owns), :meth:`get`, :meth:`candidates`, :meth:`sample`.

Files per round (:meth:`save`): ``round_XX.rankRRR_ofPPP.npz`` (own slot rows, scores, the dictionary's ids),
``round_XX.rankRRR_ofPPP.texts.rfcc`` and ``.dict.rfcc`` (the two string tables, in the checksummed cache format),
and ``round_XX.sharded.json`` (world size, N, K, C), written by rank 0 once every rank's files are in place: the
round's cache exists when that index does. :meth:`load` on the same world size reads its own files; on another world
size every rank streams the old files and keeps what it now owns (the ids do not change), and a single-process
``round_XX.rfcc`` is read the same way (:func:`load_any`).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from rest_fast.cache._pycache import normalize_caption, splitmix64
from rest_fast.cache.exchange import Exchange

__all__ = ["ShardedCaptionCache", "video_block", "sample_slots", "index_path", "shard_stem", "load_any",
           "to_single_process"]

_POPCOUNT_U8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_MASK64 = (1 << 64) - 1


def video_block(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)``: the videos rank ``rank`` owns (near-equal contiguous blocks, as ``DistEnv.shard``)."""
    return (n * rank) // world, (n * (rank + 1)) // world


def _splitmix_np(x: np.ndarray) -> np.ndarray:
    """:func:`splitmix64` on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_slots(slots: np.ndarray, videos: np.ndarray, seed: int) -> np.ndarray:
    """``CaptionCache.sample`` on a slot table: for each video the ``h mod count``-th filled slot (slot order),
    ``h = splitmix64(splitmix64(seed mod 2**64) ^ video)``; ``-1`` for a video with no filled slot. int64 ``[n]``.

    Args:
        slots: int ``[n, K]`` the videos' slot ids (``-1`` = empty), row ``i`` for ``videos[i]``.
        videos: int64 ``[n]`` the video indices (they seed the draw).
    """
    slots = np.asarray(slots)
    videos = np.asarray(videos, dtype=np.int64)
    if slots.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    s = np.uint64(splitmix64(int(seed) & _MASK64))
    h = _splitmix_np(s ^ videos.astype(np.uint64))
    filled = slots >= 0
    count = filled.sum(1)
    pick = (h % np.maximum(count, 1).astype(np.uint64)).astype(np.int64)
    hit = filled & (np.cumsum(filled, 1) == pick[:, None] + 1)
    out = slots[np.arange(slots.shape[0]), hit.argmax(1)].astype(np.int64)
    out[count == 0] = -1
    return out


def _ranks_of_set_bits(bits: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, int]:
    """``(number of set bits before each position in pos, set bits in all)`` of a little-endian bitmap (uint8, a
    multiple of 8 bytes). Works per 64-bit word — a word-count prefix sum plus one masked word per position — so
    the scratch is 2 bytes per 8 positions (at 10M videos x 24 initial captions: 60 MB), not 8 per position."""
    words = bits.view(np.uint64)
    per_word = _POPCOUNT_U8[bits].reshape(-1, 8).sum(1, dtype=np.int64)
    before = np.cumsum(per_word) - per_word
    total = int(per_word.sum())
    if pos.size == 0:
        return np.empty(0, dtype=np.int64), total
    w = pos >> 6
    mask = (np.uint64(1) << (pos & 63).astype(np.uint64)) - np.uint64(1)
    low = (words[w] & mask).view(np.uint8).reshape(-1, 8)
    return before[w] + _POPCOUNT_U8[low].sum(1, dtype=np.int64), total


def shard_stem(folder: str | Path, r: int, rank: int, world: int) -> Path:
    return Path(folder) / f"round_{r:02d}.rank{rank:03d}_of{world:03d}"


def index_path(folder: str | Path, r: int) -> Path:
    return Path(folder) / f"round_{r:02d}.sharded.json"


def _owner_of_text(encoded: list[bytes], world: int) -> np.ndarray:
    return np.fromiter((zlib.crc32(b) for b in encoded), dtype=np.int64, count=len(encoded)) % world


class ShardedCaptionCache:
    """The REST caption cache over the ranks of ``group`` (see the module doc for what each rank holds).

    Args:
        num_videos: N (every rank passes the same).
        k: K, the slots per video.
        group: the process group (default: the world; none initialised = one process, which holds everything).
        device: where collectives run on NCCL (this rank's CUDA device); gloo uses CPU tensors.
    """

    def __init__(self, num_videos: int, k: int, *, group=None, device=None) -> None:
        from rest_fast.cache import CaptionCache

        if num_videos < 0 or not 1 <= k <= 1024:
            raise ValueError(f"need num_videos >= 0 and 1 <= k <= 1024, got {num_videos}, {k}")
        self.comm = Exchange(group, device)
        self.world, self.rank = self.comm.world, self.comm.rank
        self.n, self.k = int(num_videos), int(k)
        self.lo, self.hi = video_block(self.n, self.rank, self.world)
        self._ids = np.full((self.n, self.k + 1), -1, dtype=np.int32)  # K slots + pending, every video
        self._scores = np.full((self.hi - self.lo, self.k), -np.inf, dtype=np.float32)  # own videos
        self._store = CaptionCache(1, 1)  # texts of ids c with c mod P == rank, local row c // P
        self._dict = CaptionCache(1, 1)  # texts hashing to this rank ...
        self._dict_gid = np.empty(0, dtype=np.int64)  # ... and their global ids
        self.count = 0

    # --- sizes and local look-ups ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.count

    @property
    def version(self) -> int:
        return self.count

    @property
    def num_videos(self) -> int:
        return self.n

    @property
    def slot_ids(self) -> np.ndarray:
        """int32 ``[N, K]`` every video's slot ids (a view)."""
        return self._ids[:, : self.k]

    @property
    def pending(self) -> np.ndarray:
        """int32 ``[N]`` every video's pending caption id (a view)."""
        return self._ids[:, self.k]

    def own_captions(self) -> int:
        """Caption strings whose id this rank owns (its rows of the caption-feature table)."""
        return len(self._store) if self.count else 0

    def texts(self, ids) -> list[str]:
        """Texts of caption ids this rank owns (``id mod P == rank``); any other id -> ``IndexError``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and ((ids < 0).any() or (ids >= self.count).any() or (ids % self.world != self.rank).any()):
            bad = ids[(ids < 0) | (ids >= self.count) | (ids % self.world != self.rank)][0]
            raise IndexError(f"caption id {int(bad)} is not held by rank {self.rank} of {self.world}")
        return list(self._store.texts((ids // self.world).astype(np.int32)))

    def text(self, i: int) -> str:
        return self.texts([i])[0]

    def get(self, videos) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [n, K], scores float32 [n, K])`` of this rank's own videos (``[lo, hi)``)."""
        v = np.asarray(videos, dtype=np.int64).reshape(-1)
        if v.size and (v.min() < self.lo or v.max() >= self.hi):
            raise IndexError(f"rank {self.rank} holds the scores of videos [{self.lo}, {self.hi}) only")
        return self._ids[v, : self.k].copy(), self._scores[v - self.lo].copy()

    def candidates(self, videos, neighbours) -> np.ndarray:
        """int32 ``[n, (H+1)(K+1)]``: the slot and pending ids of each video and of its H neighbours (``-1`` = none;
        repeats kept — the re-rank scores each distinct id once). Any video, from the replicated slot table."""
        v = np.asarray(videos, dtype=np.int64).reshape(-1, 1)
        nb = np.asarray(neighbours).astype(np.int64, copy=False)
        if nb.ndim != 2 or nb.shape[0] != v.shape[0]:
            raise ValueError(f"neighbours must be [{v.shape[0]}, H], got {nb.shape}")
        rows = np.concatenate([v, nb], axis=1)
        if rows.size and (rows.max() >= self.n or rows.min() < -1):
            raise IndexError(f"video index outside [-1, {self.n})")
        got = self._ids[np.maximum(rows, 0)]  # [n, H+1, K+1]
        got[rows < 0] = -1
        return got.reshape(v.shape[0], -1)

    def sample(self, videos, seed: int) -> np.ndarray:
        """``CaptionCache.sample``: one filled slot id per video (any video), int64 ``[n]``."""
        v = np.asarray(videos, dtype=np.int64).reshape(-1)
        return sample_slots(self._ids[v, : self.k], v, seed)

    def snapshot_round(self, r: int) -> None:
        """Rounds are kept as files (:meth:`save`, ``captions/round_XX.jsonl``), not in memory."""

    # --- collective calls --------------------------------------------------------------------------------------
    def intern(self, texts: list[str], positions, space: int) -> np.ndarray:
        """Global ids of ``texts`` (int64), interning the new ones. Collective.

        Args:
            texts: this rank's strings (normalised like ``CaptionCache.intern``).
            positions: int64 ``[len(texts)]`` their places in the global input order, unique over all ranks, in
                ``[0, space)``: new ids follow the first appearance in that order (round 0: ``video·M + j`` for
                the j-th of a video's M initial captions; a caption round: the video index).
            space: the size of the position range (the same on every rank).
        """
        P = self.world
        enc = [normalize_caption(t).encode("utf-8") for t in texts]
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size != len(enc):
            raise ValueError(f"{len(enc)} texts but {pos.size} positions")
        if pos.size and (pos.min() < 0 or pos.max() >= space):
            raise ValueError(f"positions must be in [0, {space})")
        owner = _owner_of_text(enc, P)
        order = np.argsort(owner, kind="stable")
        cut = np.searchsorted(owner[order], np.arange(P + 1))
        got_txt = self.comm.strings([[enc[i] for i in order[cut[d]: cut[d + 1]]] for d in range(P)])
        got_pos = self.comm.arrays([pos[order[cut[d]: cut[d + 1]]] for d in range(P)])
        sizes = [len(g) for g in got_txt]
        flat = [b.decode("utf-8") for part in got_txt for b in part]
        allpos = np.concatenate(got_pos) if got_pos else np.empty(0, np.int64)

        before = len(self._dict)
        loc = np.asarray(self._dict.intern(flat), dtype=np.int64)
        added = len(self._dict) - before
        new = loc >= before
        first = np.full(added, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, loc[new] - before, allpos[new])
        # the global order of this call's new texts: one bit per position, set at each new text's first position
        bits = np.zeros(-(-space // 64) * 8, dtype=np.uint8)  # whole 64-bit words
        np.bitwise_or.at(bits, first >> 3, np.left_shift(1, first & 7).astype(np.uint8))
        bits = self.comm.sum_bytes(bits)  # owners' bits are disjoint (a position holds one text, of one owner)
        new_gid, total_new = _ranks_of_set_bits(bits, first)
        new_gid += self.count
        self._dict_gid = np.concatenate([self._dict_gid, new_gid])

        # answers to the senders, in the order they sent
        reply = self._dict_gid[loc] if loc.size else np.empty(0, np.int64)
        back = self.comm.arrays(np.split(reply, np.cumsum(sizes)[:-1]))
        out = np.empty(len(enc), dtype=np.int64)
        out[order] = np.concatenate(back) if back else np.empty(0, np.int64)

        # the new texts to their id owners, who keep them at local row id // P
        new_texts = [t.encode("utf-8") for t in self._dict.texts(np.arange(before, before + added, dtype=np.int32))]
        dest = new_gid % P
        o2 = np.argsort(dest, kind="stable")
        c2 = np.searchsorted(dest[o2], np.arange(P + 1))
        recv_txt = self.comm.strings([[new_texts[i] for i in o2[c2[d]: c2[d + 1]]] for d in range(P)])
        recv_gid = self.comm.arrays([new_gid[o2[c2[d]: c2[d + 1]]] for d in range(P)])
        gids = np.concatenate(recv_gid) if recv_gid else np.empty(0, np.int64)
        txts = [b.decode("utf-8") for part in recv_txt for b in part]
        srt = np.argsort(gids, kind="stable")
        expect = np.arange(self.count, self.count + total_new, dtype=np.int64)
        expect = expect[expect % P == self.rank]
        if not np.array_equal(gids[srt], expect):
            raise RuntimeError("sharded intern: the new ids this rank owns are not dense (ranks disagree)")
        stored = np.asarray(self._store.intern([txts[i] for i in srt]), dtype=np.int64)
        if stored.size and not np.array_equal(stored, expect // P):
            raise RuntimeError("sharded intern: a new caption was already in this rank's store")
        self.count += total_new
        return out

    def texts_of(self, ids) -> list[str | None]:
        """Texts of any caption ids (``None`` for ``-1``), fetched from their owners. Collective."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        P = self.world
        idx = np.flatnonzero(ids >= 0)
        dest = ids[idx] % P
        order = idx[np.argsort(dest, kind="stable")]
        cut = np.searchsorted(ids[order] % P, np.arange(P + 1))
        asked = self.comm.arrays([ids[order[cut[d]: cut[d + 1]]] for d in range(P)])
        answers = self.comm.strings([[t.encode("utf-8") for t in self.texts(a)] for a in asked])
        out: list[str | None] = [None] * ids.size
        for i, b in zip(order.tolist(), (b for part in answers for b in part)):
            out[i] = b.decode("utf-8")
        return out

    def sample_texts(self, videos, seed: int) -> list[str]:
        """The texts of :meth:`sample` (one caption per video, any video; fetched from their owners). Collective."""
        ids = self.sample(videos, seed)
        out = self.texts_of(ids)
        if any(t is None for t in out):
            raise IndexError("a sampled video has no caption in its slots")
        return out  # type: ignore[return-value]

    def set_own(self, ids, scores) -> None:
        """Replace the slots of this rank's videos (``ids`` int ``[hi-lo, K]``, ``-1`` empty; ``scores`` float), then
        share the ids with every rank. Collective."""
        ids = np.asarray(ids)
        scores = np.asarray(scores, dtype=np.float32)
        if ids.shape != (self.hi - self.lo, self.k) or scores.shape != ids.shape:
            raise ValueError(f"set_own needs [{self.hi - self.lo}, {self.k}] ids and scores, got {ids.shape}, "
                             f"{scores.shape}")
        if ids.size and (ids.min() < -1 or ids.max() >= self.count):
            raise IndexError(f"slot ids must be in [-1, {self.count})")
        self._ids[self.lo: self.hi, : self.k] = ids
        self._scores[:] = np.where(ids >= 0, scores, -np.inf)
        self._share_rows()

    def add_pending_own(self, ids) -> None:
        """This rank's videos' pending captions (int ``[hi-lo]``, ``-1`` clears), shared with every rank. Collective."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size != self.hi - self.lo:
            raise ValueError(f"add_pending_own needs {self.hi - self.lo} ids, got {ids.size}")
        self._ids[self.lo: self.hi, self.k] = ids
        self._share_rows()

    def _share_rows(self) -> None:
        self.comm.gather_blocks(self._ids, [video_block(self.n, r, self.world) for r in range(self.world)])

    def distinct_in_slots(self) -> int:
        """Distinct caption ids over every video's slots (local: the slot table is replicated)."""
        s = self.slot_ids
        return int(np.unique(s[s >= 0]).size)

    # --- files -------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, r: int) -> Path:
        """Write this rank's files of round ``r`` and, once all are written, rank 0 the index. Collective.
        Returns the index path."""
        from rest_fast.atomic_io import atomic_open, atomic_write_json

        folder = Path(folder)
        stem = shard_stem(folder, r, self.rank, self.world)
        with atomic_open(f"{stem}.npz", "wb") as f:
            np.savez(f, ids=self._ids[self.lo: self.hi], scores=self._scores, dict_gid=self._dict_gid,
                     meta=np.array([self.n, self.k, self.world, self.rank, self.count], dtype=np.int64))
        self._store.save(f"{stem}.texts.rfcc")
        self._dict.save(f"{stem}.dict.rfcc")
        self.comm.sum_ints([0])  # every rank's files are in place before the index names them
        idx = index_path(folder, r)
        if self.rank == 0:
            atomic_write_json(idx, {"format": "rest_fast.sharded_cache/1", "round": r, "world_size": self.world,
                                    "num_videos": self.n, "k": self.k, "num_captions": self.count})
        self.comm.sum_ints([0])
        return idx

    @classmethod
    def load(cls, folder: str | Path, r: int, *, group=None, device=None) -> ShardedCaptionCache:
        """Round ``r``'s cache on this world size: a sharded save (any world size) or a one-process ``.rfcc``."""
        folder = Path(folder)
        idx = index_path(folder, r)
        if idx.is_file():
            meta = _read_index(idx)
            out = cls(meta["num_videos"], meta["k"], group=group, device=device)
            out._load_sharded(folder, r, meta)
            return out
        single = folder / f"round_{r:02d}.rfcc"
        if not single.is_file():
            raise FileNotFoundError(f"no caption cache of round {r} in {folder}")
        from rest_fast.cache import CaptionCache

        cache = CaptionCache.load(str(single))
        out = cls(cache.num_videos, cache.k, group=group, device=device)
        out._from_single(cache)
        return out

    def _from_single(self, cache) -> None:
        """Take this rank's share of a one-process cache (every rank reads the same file)."""
        C, P = len(cache), self.world
        self.count = C
        ids, scores = cache.get(np.arange(self.n, dtype=np.int64))
        self._ids[:, : self.k] = ids
        self._scores[:] = scores[self.lo: self.hi]
        mine = np.arange(self.rank, C, P, dtype=np.int64)
        self._store.intern(list(cache.texts(mine.astype(np.int32))))
        everything = list(cache.texts(np.arange(C, dtype=np.int32)))
        keep = np.flatnonzero(_owner_of_text([t.encode("utf-8") for t in everything], P) == self.rank)
        self._dict.intern([everything[i] for i in keep])
        self._dict_gid = keep.astype(np.int64)

    def _load_sharded(self, folder: Path, r: int, meta: dict) -> None:
        from rest_fast.cache import CaptionCache

        old, P = int(meta["world_size"]), self.world
        self.count = int(meta["num_captions"])
        parts = [shard_stem(folder, r, o, old) for o in range(old)]
        for o, stem in enumerate(parts):  # slot ids of every video, scores of this rank's
            with np.load(f"{stem}.npz", allow_pickle=False) as z:
                lo, hi = video_block(self.n, o, old)
                ids = z["ids"]
                if ids.shape != (hi - lo, self.k + 1):
                    raise ValueError(f"{stem}.npz: slot rows {ids.shape}, expected {(hi - lo, self.k + 1)}")
                self._ids[lo:hi] = ids
                a, b = max(lo, self.lo), min(hi, self.hi)
                if b > a:
                    self._scores[a - self.lo: b - self.lo] = z["scores"][a - lo: b - lo]
                if old == P and o == self.rank:
                    self._dict_gid = z["dict_gid"].astype(np.int64)
        if old == P:
            self._store = CaptionCache.load(f"{parts[self.rank]}.texts.rfcc")
            self._dict = CaptionCache.load(f"{parts[self.rank]}.dict.rfcc")
            return
        # another world size: stream every old rank's tables and keep what this rank owns now (ids unchanged)
        gids, texts = [], []
        dict_texts, dict_gids = [], []
        for o, stem in enumerate(parts):
            store = CaptionCache.load(f"{stem}.texts.rfcc")
            g = np.arange(len(store), dtype=np.int64) * old + o
            g = g[g < self.count]
            keep = np.flatnonzero(g % P == self.rank)
            gids.append(g[keep])
            texts.extend(store.texts((keep).astype(np.int32)))
            d = CaptionCache.load(f"{stem}.dict.rfcc")
            with np.load(f"{stem}.npz", allow_pickle=False) as z:
                dg = z["dict_gid"].astype(np.int64)
            all_d = list(d.texts(np.arange(len(d), dtype=np.int32))) if len(dg) else []
            sel = np.flatnonzero(_owner_of_text([t.encode("utf-8") for t in all_d], P) == self.rank)
            dict_texts.extend(all_d[i] for i in sel)
            dict_gids.append(dg[sel])
        g = np.concatenate(gids) if gids else np.empty(0, np.int64)
        srt = np.argsort(g, kind="stable")
        self._store.intern([texts[i] for i in srt])
        self._dict.intern(dict_texts)
        self._dict_gid = np.concatenate(dict_gids) if dict_gids else np.empty(0, np.int64)


def _read_index(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
        for key in ("world_size", "num_videos", "k", "num_captions"):
            int(meta[key])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a sharded caption-cache index ({e})") from None
    return meta


def load_any(folder: str | Path, r: int, *, distributed: bool, group=None, device=None):
    """Round ``r``'s caption cache for this process: a :class:`ShardedCaptionCache` under torchrun, else a
    one-process ``CaptionCache`` (from a ``.rfcc`` file, or assembled from a sharded save)."""
    folder = Path(folder)
    if distributed:
        return ShardedCaptionCache.load(folder, r, group=group, device=device)
    from rest_fast.cache import CaptionCache

    single = folder / f"round_{r:02d}.rfcc"
    if single.is_file():
        return CaptionCache.load(str(single))
    return to_single_process(folder, r)


def to_single_process(folder: str | Path, r: int):
    """A one-process ``CaptionCache`` from round ``r``'s sharded files (same ids, slots and scores)."""
    from rest_fast.cache import CaptionCache

    folder = Path(folder)
    meta = _read_index(index_path(folder, r))
    old, n, k, C = (int(meta[x]) for x in ("world_size", "num_videos", "k", "num_captions"))
    stores = [CaptionCache.load(f"{shard_stem(folder, r, o, old)}.texts.rfcc") for o in range(old)]
    texts = [stores[g % old].text(g // old) for g in range(C)]
    cache = CaptionCache(n, k)
    ids = np.asarray(cache.intern(texts), dtype=np.int64)
    if not np.array_equal(ids, np.arange(C)):
        raise ValueError(f"{folder}: round {r}'s sharded caption tables are inconsistent")
    del texts, stores
    for o in range(old):
        lo, hi = video_block(n, o, old)
        with np.load(f"{shard_stem(folder, r, o, old)}.npz", allow_pickle=False) as z:
            rows, scores = z["ids"], z["scores"]
        v = np.arange(lo, hi, dtype=np.int64)
        cache.set(v, rows[:, :k].astype(np.int32), scores.astype(np.float32))
        cache.add_pending(v, rows[:, k].astype(np.int32))
    return cache
