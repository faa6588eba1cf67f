"""Evaluation protocols: counts, name-to-index mapping, and the known split-file traps."""

from __future__ import annotations

import collections
from importlib import resources

import pytest

from rest_fast.eval import clean_class_name
from rest_fast.eval import protocols as P


def _k(name):
    return P.read_class_list(name)


K400 = "kinetics400.txt"
K600 = "kinetics600.txt"
C620 = "erzsar_kinetics_zsl220_classes620.txt"
NEW220 = "erzsar_kinetics_zsl220_new220.txt"


def test_assets_ship_as_package_data():
    root = resources.files("rest_fast").joinpath("assets")
    assert root.joinpath("SOURCES.md").is_file()
    for f in ("hmdb51.txt", "ucf101.txt", K400, C620, "erzsar_k220_split2_test160.txt"):
        assert root.joinpath("labels", f).is_file(), f
    for f in ("hmdb_splits_val3.txt", "ucf_splits_train1_few_shot_16.txt", "k400_splits_val.txt"):
        assert root.joinpath("splits", f).is_file(), f


def test_names_splits_shots_and_aliases():
    assert P.names() == ("hmdb51", "ucf101", "k220", "k220-generalized", "k400")
    for n in ("hmdb51", "ucf101", "k220", "k220-generalized"):
        assert P.splits(n) == (1, 2, 3)
    assert P.splits("k400") == (None,)
    assert P.shots("hmdb51") == P.shots("ucf101") == (2, 4, 8, 16)
    assert P.shots("k220") == ()
    assert P.get("HMDB").name == "hmdb51" and P.get("k220_generalized", 2).name == "k220-generalized"
    assert P.get("hmdb51").split == 1  # None -> first split
    assert P.get("ucf101", split="2").split == 2


# ---------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("split", [1, 2, 3])
def test_hmdb51_counts(split):
    p = P.get("hmdb51", split=split)
    assert p.num_classes == 51 and len(p.videos) == 1530
    counts = collections.Counter(p.labels)
    assert len(counts) == 51 and set(counts.values()) == {30}  # 30 test videos per class per split


@pytest.mark.parametrize("split,n", [(1, 3783), (2, 3734), (3, 3696)])
def test_ucf101_counts(split, n):
    p = P.get("ucf101", split=split)
    assert p.num_classes == 101 and len(p.videos) == n and len(set(p.labels)) == 101


@pytest.mark.parametrize("name,n_cls", [("hmdb51", 51), ("ucf101", 101)])
@pytest.mark.parametrize("shots", [2, 4, 8, 16])
def test_few_shot_lists(name, n_cls, shots):
    p = P.get(name, shots=shots)
    assert p.is_train and p.split == 1 and p.shots == shots
    assert len(p.videos) == shots * n_cls
    assert set(collections.Counter(p.labels).values()) == {shots}
    test = {path for path, _ in P.get(name, split=1).videos}
    assert not test & {path for path, _ in p.videos}  # train and test of split 1 are disjoint


@pytest.mark.parametrize("split,n", [(1, 14_084), (2, 13_978), (3, 14_136)])
def test_k220_and_generalized(split, n):
    p = P.get("k220", split=split)
    g = P.get("k220-generalized", split=split)
    assert p.num_classes == 160 and g.num_classes == 620
    assert len(set(p.labels)) == 160
    assert len(p.videos) == len(g.videos) == n
    assert [v for v, _ in p.videos] == [v for v, _ in g.videos]  # the same eval videos
    # Name-to-index: each remapped label names the same class as the 160-way label.
    assert all(g.class_names[yg] == p.class_names[y] for (_, y), (_, yg) in zip(p.videos, g.videos))
    assert all(400 <= yg < 620 for yg in g.labels)  # novel classes only: K400 classes are distractors
    assert g.class_names == list(_k(C620))
    assert set(p.class_names) <= set(_k(NEW220))


def test_k220_splits_differ_but_overlap():
    sets = [set(P.get("k220", s).class_names) for s in (1, 2, 3)]
    assert sets[0] != sets[1] != sets[2]
    assert all(len(a & b) > 100 for a in sets for b in sets)


def test_k400_val():
    p = P.get("k400")
    assert p.split is None and p.num_classes == 400 and len(p.videos) == 19_877
    assert len(set(p.labels)) == 400
    assert p.videos[0][0].startswith("val/") and not p.videos[0][0].endswith("\r")  # CRLF file


def test_class_list_relations():
    k400, k600, c620, new220 = _k(K400), _k(K600), _k(C620), _k(NEW220)
    assert (len(k400), len(k600), len(c620), len(new220)) == (400, 600, 620, 220)
    assert list(c620[:400]) == list(k400) and list(c620[400:]) == list(new220)
    assert set(new220) <= set(k600)


# ---------------------------------------------------------------------------------------------- traps
def test_k600_lowercase_american_football_trap():
    k400, k600, new220 = _k(K400), _k(K600), _k(NEW220)
    assert "passing American football (not in game)" in k400
    assert "passing american football (not in game)" in k600
    assert "passing American football (not in game)" not in k600
    naive = [c for c in k600 if c not in set(k400)]
    assert len(naive) == 232  # exact-string K600 \ K400 counts 12 renamed K400 classes as new
    assert "passing american football (not in game)" in naive
    lower400 = {c.lower() for c in k400}
    assert not any(c.lower() in lower400 for c in new220)  # none of the 220 is a K400 class in disguise
    for s in (1, 2, 3):
        names = P.get("k220", s).class_names
        assert not any("american football" in c.lower() for c in names)


@pytest.mark.parametrize("shots", [None, 2, 4, 8, 16])
@pytest.mark.parametrize("name", ["hmdb51", "ucf101"])
def test_every_hmdb_ucf_label_agrees_with_its_file_name(name, shots):
    for split in (1, 2, 3) if shots is None else (1,):
        p = P.get(name, split=split, shots=shots)
        assert P.path_label_mismatches(p) == [], (name, split, shots)


def test_hmdb_kick_and_sword_are_not_swapped():
    names = _k("hmdb51.txt")
    p = P.get("hmdb51", 1)
    for a, b in (("kick", "kick_ball"), ("sword", "sword_exercise")):
        ia, ib = names.index(a), names.index(b)
        assert ia < ib  # official (ASCII) order
        vids_a = [v for v, y in p.videos if y == ia]
        vids_b = [v for v, y in p.videos if y == ib]
        assert len(vids_a) == len(vids_b) == 30
        assert all(P.class_from_path("hmdb51", v) == a for v in vids_a)
        assert all(P.class_from_path("hmdb51", v) == b for v in vids_b)
    # A class list with the X-CLIP swap is caught by the file-name check.
    swapped = list(names)
    ik, ikb = swapped.index("kick"), swapped.index("kick_ball")
    swapped[ik], swapped[ikb] = swapped[ikb], swapped[ik]
    bad = P.Protocol("hmdb51", 1, None, swapped, p.videos, p.video_list, "swapped")
    mism = P.path_label_mismatches(bad)
    assert len(mism) == 60 and {m[1] for m in mism} == {"kick", "kick_ball"}


def test_ucf_classind_order_not_the_sorted_word_order():
    names = list(_k("ucf101.txt"))
    assert names.index("Hammering") + 1 == names.index("HammerThrow")
    assert names.index("JumpingJack") + 1 == names.index("JumpRope")
    # Sorting the space-separated names (what the ER-ZSAR / CLIP word lists did) swaps exactly these two pairs.
    by_words = sorted(names, key=lambda n: clean_class_name(n).replace("-", " "))
    moved = [i for i, (a, b) in enumerate(zip(names, by_words)) if a != b]
    assert [names[i] for i in moved] == ["Hammering", "HammerThrow", "JumpingJack", "JumpRope"]
    p = P.get("ucf101", 1)
    for cls in ("Hammering", "HammerThrow", "JumpingJack", "JumpRope", "HandstandPushups"):
        y = names.index(cls)
        vids = [v for v, lab in p.videos if lab == y]
        assert vids and all(P.class_from_path("ucf101", v) == cls for v in vids)


def test_class_from_path():
    assert P.class_from_path("hmdb51", "x_kick_ball_f_cm_np1_ri_med_0.avi") == "kick_ball"
    assert P.class_from_path("hmdb51", "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi") == "brush_hair"
    assert P.class_from_path("hmdb51", "Sword_Fight_sword_f_cm_np2_le_bad_1.avi") == "sword"
    assert P.class_from_path("hmdb51", "not_a_hmdb_name.avi") is None
    assert P.class_from_path("ucf101", "v_HandStandPushups_g01_c01.avi") == "HandstandPushups"
    assert P.class_from_path("ucf101", "v_NoSuchClass_g01_c01.avi") is None
    with pytest.raises(ValueError, match="hmdb51 and ucf101"):
        P.class_from_path("k400", "val/x.mp4")


# ---------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    with pytest.raises(ValueError, match="unknown protocol"):
        P.get("kinetics700")
    with pytest.raises(ValueError, match=r"splits \(1, 2, 3\)"):
        P.get("hmdb51", split=4)
    with pytest.raises(ValueError, match="splits"):
        P.get("ucf101", split="all")
    with pytest.raises(ValueError, match="no splits"):
        P.get("k400", split=1)
    with pytest.raises(ValueError, match="shots"):
        P.get("hmdb51", shots=3)
    with pytest.raises(ValueError, match="no few-shot"):
        P.get("k220", split=1, shots=8)
    with pytest.raises(ValueError, match="split 1 only"):
        P.get("ucf101", split=2, shots=8)
    with pytest.raises(ValueError, match="splits"):
        P.get("hmdb51", split=True)
    with pytest.raises(TypeError):
        P.get(51)


# ---------------------------------------------------------------------------------------------- locate
def test_locate_flat_and_class_folder_layouts(tmp_path):
    p = P.get("ucf101", 1)
    (a, ya), (b, yb), (c, _) = p.videos[0], p.videos[200], p.videos[400]
    (tmp_path / a).write_bytes(b"")  # flat, as the list writes it
    (tmp_path / p.class_names[yb]).mkdir()
    (tmp_path / p.class_names[yb] / b).write_bytes(b"")  # UCF-101/<Class>/<file>
    found, missing = p.locate(tmp_path)
    assert found == [(str(tmp_path / a), ya), (str(tmp_path / p.class_names[yb] / b), yb)]
    assert len(missing) == len(p.videos) - 2 and c in missing
    # An unknown layout is found by walking the tree.
    (tmp_path / "odd" / "place").mkdir(parents=True)
    (tmp_path / "odd" / "place" / c).write_bytes(b"")
    assert len(p.locate(tmp_path)[0]) == 2
    assert len(p.locate(tmp_path, walk=True)[0]) == 3


def test_locate_kinetics_class_folders(tmp_path):
    p = P.get("k400")
    rel, y = p.videos[0]
    cls_dir = tmp_path / "val" / p.class_names[y].replace(" ", "_")
    cls_dir.mkdir(parents=True)
    (cls_dir / rel.split("/")[-1]).write_bytes(b"")
    found, missing = p.locate(tmp_path)
    assert found == [(str(cls_dir / rel.split("/")[-1]), y)] and len(missing) == len(p.videos) - 1
