"""Video features under torchrun without any rank holding all N rows (issue 20, item 5).

gloo on CPU at world sizes 2 and 3 (uneven blocks, N = 23): rank 0 writes ``video_clip.npy`` from chunks received
point to point and the file equals the one-process file byte for byte; each rank gets exactly its rows (also on a
cache hit); the neighbour graph and the retrieval update built from blocks equal those built from the full table.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo_spawn import spawn_gloo

from rest_fast.train.distributed import DistEnv

N, D, H, K, M = 23, 16, 5, 3, 4
CHUNK_ROWS = 3  # the chunk size the workers ask for: rank 0 receives at most this many rows per message
ONE = DistEnv(0, 1, 0, torch.device("cpu"))


def _table() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)


class _RowsClip:
    """A stand-in CLIP whose "clips" are already the features (tests the plumbing, not the encoder)."""

    embed_dim = D

    def encode_frames(self, clips: torch.Tensor) -> torch.Tensor:
        return clips.float()


class _PerTextEncoder:
    dim = D

    def encode_text(self, texts):
        import zlib

        rows = [torch.randn(D, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def _batches(env: DistEnv, batch: int = 4):
    feats, mine = _table(), torch.from_numpy(env.shard(N))
    return [(mine[i: i + batch], feats[mine[i: i + batch]]) for i in range(0, len(mine), batch)]


def _features(env: DistEnv, folder: Path, **kw) -> torch.Tensor:
    from rest_fast.train.features import video_features

    return video_features(_RowsClip(), lambda: _batches(env), N, env, cache_dir=folder, key="k1", amp=False, **kw)


def _no_decoding():
    raise AssertionError("a cache hit must not decode videos")


def _check_features(env: DistEnv, root: Path) -> torch.Tensor:
    from rest_fast.train import features

    lo, hi = env.block(N)
    block = _features(env, root / f"world{env.world_size}", rows=(lo, hi), chunk_bytes=CHUNK_ROWS * D * 4)
    assert block.shape == (hi - lo, D) and block.dtype == torch.float32
    assert torch.equal(block, _table()[lo:hi])
    if env.is_main:  # every other rank's rows arrived in bounded chunks, never as one table
        got = features.RECEIVED_CHUNKS
        assert got and max(got) <= CHUNK_ROWS and sum(got) == N - (hi - lo), got
    hit = features.video_features(_RowsClip(), _no_decoding, N, env, cache_dir=root / f"world{env.world_size}",
                                  key="k1", rows=(lo, hi))
    assert torch.equal(hit, block)
    return block


def _check_graph(env: DistEnv, root: Path, block: torch.Tensor) -> None:
    import rest_fast.retrieval as retrieval
    from rest_fast.retrieval import NeighbourGraph
    from rest_fast.train.neighbours import neighbour_graph, rank_graph_dir

    lo, hi = env.block(N)
    full, mine = _table().half(), block.half()
    folder = root / f"graphs{env.world_size}"
    ref = neighbour_graph(full, H, env, cache_dir=folder / "full")  # the full table on every rank, as before
    got = neighbour_graph(mine, H, env, cache_dir=folder / "block", num_videos=N)
    assert got.shape == (hi - lo, H) and np.array_equal(got, ref)
    g_ref = NeighbourGraph.load(rank_graph_dir(folder / "full" / "neighbours", env.rank, env.world_size))
    g_got = NeighbourGraph.load(rank_graph_dir(folder / "block" / "neighbours", env.rank, env.world_size))
    assert torch.equal(g_ref.scores, g_got.scores) and g_ref.feature_hash == g_got.feature_hash
    one = NeighbourGraph.build(full, H, exclude_self=True, cap=False)  # one process, all rows
    assert np.array_equal(got, one.indices[lo:hi].numpy())
    torch.testing.assert_close(g_got.scores, one.scores[lo:hi].float(), atol=1e-3, rtol=0)
    # the block's tag matches the full table's: a resume holding only blocks reuses the graph (no search)
    real = retrieval.distributed_topk
    retrieval.distributed_topk = lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt the graph"))
    try:
        again = neighbour_graph(mine, H, env, cache_dir=folder / "full", num_videos=N)
    finally:
        retrieval.distributed_topk = real
    assert np.array_equal(again, ref)
    with_self = neighbour_graph(mine, H, env, cache_dir=folder / "block", include_self=True, num_videos=N)
    assert np.array_equal(with_self, neighbour_graph(full, H, env, cache_dir=folder / "full", include_self=True))
    assert np.array_equal(with_self[:, 0], np.arange(lo, hi))


def _rounds(env: DistEnv, video: torch.Tensor, neighbours: np.ndarray):
    """Round 0 (initial captions) and round 1 (via ``caption_round``) with a replicated ``CaptionCache``."""
    from rest_fast.cache import CaptionCache
    from rest_fast.train.features import CaptionFeatures
    from rest_fast.train.generate_round import caption_round
    from rest_fast.train.retrieval_update import retrieval_update

    rng = np.random.default_rng(7)
    flat = [f"caption {j}" for j in rng.integers(0, 40, size=N * M)]
    cache = CaptionCache(N, K)
    initial = np.asarray(cache.intern(flat), dtype=np.int32).reshape(N, M)
    feats = CaptionFeatures(D, torch.device("cpu"), rank=env.rank, world_size=env.world_size)
    feats.update(cache, _PerTextEncoder(), env, batch_size=5)
    s0 = retrieval_update(cache, video, feats.valid, neighbours, K, env, initial_ids=initial, budget_bytes=3000)
    out = [(*cache.get(np.arange(N)), s0)]
    s1 = caption_round(1, [f"generated {i % 9}" for i in range(N)], cache, feats, _PerTextEncoder(), video,
                       neighbours, K, env, batch_size=5)
    out.append((*cache.get(np.arange(N)), s1))
    return out


def _check_update(env: DistEnv, block: torch.Tensor) -> None:
    from rest_fast.train.neighbours import neighbour_graph

    lo, hi = env.block(N)
    full = _table().half()
    nb = neighbour_graph(block.half(), H, env, cache_dir=Path(os.environ["VF_ROOT"]) / f"upd{env.world_size}",
                         num_videos=N)
    with_full, with_block = _rounds(env, full, nb), _rounds(env, block.half(), nb)
    for (ids_f, s_f, st_f), (ids_b, s_b, st_b) in zip(with_full, with_block):
        assert np.array_equal(ids_f, ids_b) and np.array_equal(s_f, s_b)
        assert {k: v for k, v in st_f.items() if k != "rerank_bytes_sent"} == \
            {k: v for k, v in st_b.items() if k != "rerank_bytes_sent"}
    with pytest.raises(ValueError, match="video_feats has"):
        _rounds(env, full[: hi - lo + 1] if hi - lo + 1 != N else full[:2], nb)


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # kernels are tested apart; this is the plumbing
    os.environ["VF_ROOT"] = root
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        env = DistEnv(rank, world, rank, torch.device("cpu"))
        block = _check_features(env, Path(root))
        _check_graph(env, Path(root), block)
        _check_update(env, block)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, root: Path) -> Path:
    """Run the workers in a fresh folder under ``root`` and return it (a retry must not find the first try's files:
    it would take the cache hit and receive no chunk)."""
    attempt = spawn_gloo(_worker, world, lambda port, n: (world, port, str(_fresh(root / f"try{n}"))))
    return root / f"try{attempt}"


def _fresh(folder: Path) -> Path:
    folder.mkdir()
    return folder


@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.slow), 3])  # 3: ~10 s on 2 cores
def test_video_features_blocks_match_one_process(tmp_path, world):
    one = _features(ONE, tmp_path / "one")
    assert torch.equal(one, _table())
    mask = os.umask(0o027)
    try:
        folder = _spawn(world, tmp_path)
    finally:
        os.umask(mask)
    ours = folder / f"world{world}" / "video_clip.npy"
    assert ours.read_bytes() == (tmp_path / "one" / "video_clip.npy").read_bytes()
    assert ours.stat().st_mode & 0o777 == 0o640  # the umask, not tempfile's 0600
    assert not [p.name for p in ours.parent.iterdir() if p.name.endswith(".tmp")]


def test_rows_in_one_process(tmp_path):
    got = _features(ONE, tmp_path, rows=(5, 11))
    assert torch.equal(got, _table()[5:11])
    assert torch.equal(_features(ONE, tmp_path), _table())  # the cache hit returns all rows by default
    with pytest.raises(ValueError, match="rows must satisfy"):
        _features(ONE, tmp_path, rows=(4, N + 1))


def test_feature_hash_streams_to_the_digest_of_the_whole_bytes():
    import hashlib

    from rest_fast.retrieval import feature_hash

    def whole(t: torch.Tensor) -> str:  # the digest as it was computed before: one bytes copy of the tensor
        c = t.detach().contiguous()
        return hashlib.sha256(f"{c.dtype}|{tuple(c.shape)}|".encode() + c.view(torch.uint8).numpy().tobytes()).hexdigest()

    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(37, 5, generator=g), torch.randn(37, 5, generator=g).half(),
             torch.randn(11, 7, generator=g).bfloat16().T, torch.randn(9, 3, 2, generator=g)[:, ::2],
             torch.randn(13, generator=g), torch.zeros(0, 4)]
    for t in cases:
        for chunk in (1, 7, 64, 1 << 20):  # a row per chunk, rows straddling nothing, all at once
            assert feature_hash(t, chunk_bytes=chunk) == whole(t), (t.dtype, tuple(t.shape), chunk)
