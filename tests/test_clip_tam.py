"""CLIP-TAM (caption → class) on hand-made encoders with known embeddings, plus the metrics helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rest_fast.eval import (
    accuracies,
    clean_class_name,
    clip_tam,
    confusion_matrix,
    embed_classes,
    mean_class_accuracy,
    mean_std,
    most_confused,
    nearest_classes,
    per_class_accuracy,
    score_captions,
    summarize,
    topk_accuracy,
)
from rest_fast.eval import protocols as P


class TableEncoder:
    """A text encoder with hand-set embeddings; records what it was asked to embed."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = {k: torch.tensor(v, dtype=torch.float64) for k, v in table.items()}
        self.calls: list[list[str]] = []

    def encode_text(self, texts):
        self.calls.append(list(texts))
        return torch.stack([self.table[t] for t in texts])


# ---------------------------------------------------------------------------------------------- cleanup
@pytest.mark.parametrize(
    "raw,clean",
    [
        ("ApplyEyeMakeup", "apply eye makeup"),
        ("brush_hair", "brush hair"),
        ("YoYo", "yo-yo"),
        ("PlayingDaf", "playing daf"),
        ("TaiChi", "tai chi"),
        ("HandstandPushups", "handstand pushups"),
        ("CleanAndJerk", "clean and jerk"),
        ("Skijet", "skijet"),
        ("kick_ball", "kick ball"),
        ("BMXRiding", "BMX riding"),
        ("PlayingTV", "playing TV"),
        ("Shoot3Pointers", "shoot 3 pointers"),
        ("passing American football (not in game)", "passing american football (not in game)"),
        ("backflip (human)", "backflip (human)"),
        ("  extra__spaces  ", "extra spaces"),
    ],
)
def test_clean_class_name(raw, clean):
    assert clean_class_name(raw) == clean


def test_cleanup_of_every_shipped_class_list_is_unique_and_spaced():
    for f in ("hmdb51.txt", "ucf101.txt", "kinetics400.txt", "erzsar_kinetics_zsl220_classes620.txt"):
        names = P.read_class_list(f)
        cleaned = [clean_class_name(n) for n in names]
        assert len(set(cleaned)) == len(cleaned), f
        assert all("_" not in c and c == c.strip() and "  " not in c for c in cleaned), f
        assert all(c == c.lower() for c in cleaned), f  # no acronyms in these lists
    # UCF CamelCase is split into words, and no letter is lost or added on the way.
    for n in P.read_class_list("ucf101.txt"):
        c = clean_class_name(n)
        assert c.replace(" ", "").replace("-", "") == n.lower(), n
        assert c.count(" ") + c.count("-") == sum(ch.isupper() for ch in n[1:]), n


def test_cleanup_rejects_bad_names():
    with pytest.raises(ValueError, match="empty"):
        clean_class_name(" _ ")
    with pytest.raises(TypeError):
        clean_class_name(3)


# ---------------------------------------------------------------------------------------------- clip_tam
def test_clip_tam_hand_made_case():
    enc = TableEncoder(
        {
            "apply eye makeup": [1, 0, 0],
            "brush hair": [0, 1, 0],
            "yo-yo": [0, 0, 1],
            "a woman puts on mascara": [3, 1, 0],  # cos: 3/sqrt(10), 1/sqrt(10), 0
            "a kid plays with a yoyo": [0, 1, 1],  # cos: 0, 1/sqrt(2), 1/sqrt(2): tie -> lower index first
            "someone combs": [0, 2, -1],  # cos: 0, 2/sqrt(5), -1/sqrt(5)
        }
    )
    caps = ["a woman puts on mascara", "a kid plays with a yoyo", "someone combs"]
    pred, scores = clip_tam(caps, ["ApplyEyeMakeup", "brush_hair", "YoYo"], enc, topk=3)
    assert enc.calls[0] == ["apply eye makeup", "brush hair", "yo-yo"]  # the cleanup was applied
    assert pred.dtype == torch.long and scores.dtype == torch.float32
    assert pred.tolist() == [[0, 1, 2], [1, 2, 0], [1, 0, 2]]
    r10, r2, r5 = math.sqrt(10), math.sqrt(2), math.sqrt(5)
    expected = torch.tensor([[3 / r10, 1 / r10, 0.0], [1 / r2, 1 / r2, 0.0], [2 / r5, 0.0, -1 / r5]])
    torch.testing.assert_close(scores, expected.float(), atol=1e-6, rtol=0)
    pred1, _ = clip_tam(caps, ["ApplyEyeMakeup", "brush_hair", "YoYo"], enc, topk=1)
    assert pred1.shape == (3, 1) and pred1[:, 0].tolist() == [0, 1, 1]


def test_clip_tam_without_cleanup_and_with_callable_and_numpy():
    table = {
        "ApplyEyeMakeup": np.array([1.0, 0.0]),
        "Other": np.array([0.0, 1.0]),
        "cap": np.array([0.2, 1.0]),
    }
    fn = lambda texts: np.stack([table[t] for t in texts])  # a plain callable returning numpy
    pred, scores = clip_tam(["cap"], ["ApplyEyeMakeup", "Other"], fn, topk=2, clean=False)
    assert pred.tolist() == [[1, 0]]
    torch.testing.assert_close(scores, torch.tensor([[1 / math.sqrt(1.04), 0.2 / math.sqrt(1.04)]]))


def test_templates_are_averaged():
    enc = TableEncoder(
        {
            "a video of brush hair.": [1, 0],
            "someone is brush hair.": [0, 3],  # normalised before averaging: (1,0) and (0,1)
            "a video of kick.": [1, 1],
            "someone is kick.": [-1, 1],
            "cap": [1, 1],
        }
    )
    emb = embed_classes(["brush_hair", "kick"], enc, templates=["a video of {}.", "someone is {}."])
    torch.testing.assert_close(
        emb, torch.tensor([[1.0, 1.0], [0.0, 1.0]]) / torch.tensor([[math.sqrt(2)], [1.0]])
    )
    pred, scores = clip_tam(
        ["cap"], ["brush_hair", "kick"], enc, topk=2, templates=["a video of {}.", "someone is {}."]
    )
    assert pred.tolist() == [[0, 1]]
    torch.testing.assert_close(scores, torch.tensor([[1.0, 1 / math.sqrt(2)]]))
    with pytest.raises(ValueError, match=r"\{\}"):
        embed_classes(["kick"], enc, templates=["no placeholder"])


def test_nearest_classes_against_float64_brute_force():
    g = torch.Generator().manual_seed(0)
    for n, c, d, k in [(1, 1, 3, 1), (17, 51, 16, 5), (33, 101, 7, 101), (5, 620, 32, 5)]:
        # Low intrinsic dimension (rank-3 data in d dims) so neighbours are close and ties/near-ties appear.
        basis = torch.randn(3, d, generator=g, dtype=torch.float64)
        text = torch.randint(-2, 3, (n, 3), generator=g).double() @ basis
        cls = torch.randint(-2, 3, (c, 3), generator=g).double() @ basis + 1e-3
        pred, scores = nearest_classes(text.float(), cls.float(), k)
        sims = F.normalize(text, dim=-1) @ F.normalize(cls, dim=-1).T
        ref_scores = sims.sort(dim=1, descending=True).values[:, :k]
        torch.testing.assert_close(scores.double(), ref_scores, atol=1e-5, rtol=0)
        # Re-score the returned ids exactly: they must carry the scores reported.
        torch.testing.assert_close(sims.gather(1, pred), scores.double(), atol=1e-5, rtol=0)
        assert all(len(set(row)) == k for row in pred.tolist())


def test_ties_go_to_the_lower_index():
    emb = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    pred, _ = nearest_classes(torch.tensor([[1.0, 0.0]]), emb, topk=4)
    assert pred.tolist() == [[1, 2, 3, 0]]


def test_clip_tam_with_tiny_clip_finds_the_class_from_its_own_name():
    from rest_fast.clip import tiny_clip

    clip = tiny_clip(seed=0)
    names = list(P.read_class_list("hmdb51.txt"))
    captions = [clean_class_name(n) for n in names]
    pred, scores = clip_tam(captions, names, clip, topk=5)
    assert pred.shape == (51, 5) and scores.shape == (51, 5)
    assert pred[:, 0].tolist() == list(range(51))
    torch.testing.assert_close(scores[:, 0], torch.ones(51), atol=1e-5, rtol=0)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_clip_tam_errors():
    enc = TableEncoder({"a": [1.0, 0.0], "b": [0.0, 1.0]})
    with pytest.raises(ValueError, match="topk"):
        clip_tam(["a"], ["a", "b"], enc, topk=3)
    with pytest.raises(ValueError, match="topk"):
        clip_tam(["a"], ["a", "b"], enc, topk=0)
    with pytest.raises(TypeError, match="captions"):
        clip_tam("a", ["a", "b"], enc, topk=1)
    with pytest.raises(ValueError, match="class_names"):
        clip_tam(["a"], [], enc, topk=1)
    with pytest.raises(TypeError, match="text_encoder"):
        clip_tam(["a"], ["a", "b"], object(), topk=1)
    with pytest.raises(ValueError, match="shape"):
        clip_tam(["a"], ["a", "b"], lambda t: torch.zeros(len(t) + 1, 2), topk=1)
    with pytest.raises(ValueError, match="non-finite"):
        clip_tam(["a"], ["a", "b"], lambda t: torch.full((len(t), 2), float("nan")), topk=1)
    pred, scores = clip_tam([], ["a", "b"], enc, topk=2)
    assert pred.shape == (0, 2) and scores.shape == (0, 2)


# ---------------------------------------------------------------------------------------------- metrics
def test_accuracy_helpers_hand_case():
    pred = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0], [2, 0, 1]])
    labels = torch.tensor([0, 1, 0, 1, 2])
    assert topk_accuracy(pred, labels, 1) == pytest.approx(3 / 5)
    assert topk_accuracy(pred, labels, 2) == pytest.approx(5 / 5)
    assert accuracies(pred, labels) == {"top1": pytest.approx(0.6)}  # no top5 column
    assert topk_accuracy(pred[:, 0], labels, 1) == pytest.approx(0.6)
    cm = confusion_matrix(pred, labels, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    pc = per_class_accuracy(pred, labels, 4)
    assert pc[:3].tolist() == [0.5, 0.5, 1.0] and math.isnan(pc[3])
    assert mean_class_accuracy(pred, labels, 4) == pytest.approx(2 / 3)
    assert per_class_accuracy(pred, labels, 4, k=2)[:3].tolist() == [1.0, 1.0, 1.0]
    names = ["a", "b", "c", "d"]
    assert most_confused(pred, labels, names) == [("a", "b", 1), ("b", "c", 1)]
    s = summarize(pred, labels, names)
    assert s["n"] == 5 and s["top1"] == pytest.approx(0.6) and s["per_class_top1"]["d"] is None
    assert s["most_confused"] == [["a", "b", 1], ["b", "c", 1]]


def test_most_confused_orders_by_count():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([2, 2, 1, 0, 0, 0])
    assert most_confused(pred, labels, ["x", "y", "z"], top=2) == [("x", "z", 2), ("y", "x", 2)]


def test_mean_std_and_metric_errors():
    m, s = mean_std([0.5, 0.7, 0.6])
    assert m == pytest.approx(0.6) and s == pytest.approx(math.sqrt(0.02 / 3))
    assert mean_std([0.4]) == (0.4, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
    with pytest.raises(ValueError, match="labels"):
        topk_accuracy(torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="k must"):
        topk_accuracy(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long), k=3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([5]), torch.tensor([0]), 3)
    with pytest.raises(TypeError, match="integer"):
        topk_accuracy(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))


def test_score_captions_report():
    enc = TableEncoder(
        {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0], "x": [1.0, 0.5, 0.0]}
    )
    out = score_captions(["x", "x", "c"], [0, 1, 2], ["a", "b", "c"], enc, topk=5, videos=["v0", "v1", "v2"])
    assert out["n"] == 3 and out["top1"] == pytest.approx(2 / 3)
    assert "top5" not in out  # topk capped at 3 classes
    assert out["most_confused"] == [["b", "a", 1]]
    assert out["predictions"][1] == {
        "video": "v1",
        "caption": "x",
        "label": "b",
        "topk": ["a", "b", "c"],
        "scores": [round(1 / math.sqrt(1.25), 6), round(0.5 / math.sqrt(1.25), 6), 0.0],
    }
    with pytest.raises(ValueError, match="same length"):
        score_captions(["x"], [0, 1], ["a", "b"], enc)


def test_public_api_names():
    import rest_fast.eval as ev

    assert callable(ev.clip_tam) and ev.clip_tam is clip_tam  # the function, not the submodule
    assert ev.protocols.get is P.get
