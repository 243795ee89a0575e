"""edgeclf.data: clips.csv sources as split units. Byte-identical clips join their copy's source or site (folds and
bootstrap clusters); `group=source|site` without folds groups a clip folder's plain train/val/test split; the default
plain split (by clip) says how many held-out clips share a source with a training clip.

Every data set here is built in tmp_path (cv2.VideoWriter MJPG .avi, a clips.csv)."""
from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeclf.data import Dataset, load_dataset, load_folds
from edgeclf.errors import DataError, EdgeclfError

cv2 = pytest.importorskip("cv2")

_FPS = itertools.count()


def _clip(path: Path, n_frames: int = 3) -> Path:
    """MJPG .avi; each one written gets its own frame rate, so no two are byte-identical unless copied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5 + next(_FPS) % 500, (32, 24))
    assert vw.isOpened()
    for j in range(n_frames):
        vw.write(np.full((24, 32, 3), 20 + 20 * j, np.uint8))
    vw.release()
    return path


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, EdgeclfError) and msg.strip() and "\n" not in msg, repr(msg)
    return msg


def _csv(root: Path, rows: list[tuple[str, str]]) -> None:
    lines = ["file,label,license,original_source"] + [f'{f},{f.split("/")[0]},CC BY 4.0,"{src}"' for f, src in rows]
    (root / "clips.csv").write_text("\n".join(lines) + "\n")


def _sides(ds: Dataset) -> dict[str, str]:
    """clip -> the split it is in (asserting each clip is in one)."""
    out: dict[str, str] = {}
    for s, sp in ds.splits.items():
        for i in sp.ids:
            assert out.setdefault(i.split("#")[0], s) == s, i
    return out


def _copies_tree(root: Path, *, listed_copy_source: str | None = None) -> Path:
    """covid19 and regular, 12 clips each from 12 sources (6 sites); covid19/copy_of_c<k>.avi (k < 6) is c<k>'s
    bytes, with no clips.csv row, or listed under `listed_copy_source` formatted with k."""
    rows = []
    for cls in ("covid19", "regular"):
        for k in range(12):
            _clip(root / cls / f"c{k}.avi", 3)
            rows.append((f"{cls}/c{k}.avi", f"https://www.site{cls}{k % 6}.org/p{k}"))
    for k in range(6):
        shutil.copy(root / "covid19" / f"c{k}.avi", root / "covid19" / f"copy_of_c{k}.avi")
        if listed_copy_source is not None:
            rows.append((f"covid19/copy_of_c{k}.avi", listed_copy_source.format(k)))
    _csv(root, rows)
    return root


# -- fix 1: copies and sources are one unit in source/site-grouped folds ---------------------------------------


@pytest.mark.parametrize("group", ["source", "site"])
@pytest.mark.parametrize("listed", [None, "https://mirror{}.example.net/again"])
def test_clip_copies_never_straddle_source_grouped_folds(tmp_path: Path, group: str, listed: str | None) -> None:
    """A copy without a clips.csv row (or listed under another source) was keyed apart from its original: the two
    could be in train and test of one fold although the notes said copies stay on one side of every split."""
    root = _copies_tree(tmp_path / "clips", listed_copy_source=listed)
    for ds in load_folds(str(root), 3, frames_per_clip=2, group=group):
        side = _sides(ds)
        for k in range(6):
            assert side[f"covid19/c{k}.avi"] == side[f"covid19/copy_of_c{k}.avi"], (ds.spec, k)
        # Every unit the folds split by is on one side: what the clustered intervals resample (train.cross_validate
        # reads clip_source for group=source, sources for group=site).
        unit = ds.clip_source if group == "source" else ds.sources
        held = {unit[c] for c, s in side.items() if s == "test"}
        assert not held & {unit[c] for c, s in side.items() if s != "test"}, ds.spec
        val = {unit[c] for c, s in side.items() if s == "val"}
        assert not val & {unit[c] for c, s in side.items() if s == "train"}, ds.spec


def test_a_fold_split_moved_by_joined_copies_does_not_keep_the_hash_recorded_before(tmp_path: Path) -> None:
    """Earlier code split a rowless copy by its own copy group: joined to its original's source now, its folds moved,
    and a run recorded then must not pass require_training_data on the moved split (it would score training clips as
    held out). The same files with the copies listed under their originals' sources moved nothing: hash as before."""
    from edgeclf.data import require_training_data

    a = _copies_tree(tmp_path / "a")
    b = shutil.copytree(a, tmp_path / "b")  # the same bytes; its clips.csv lists each copy under its original's source
    rows = [(f"{cls}/c{k}.avi", f"https://www.site{cls}{k % 6}.org/p{k}") for cls in ("covid19", "regular") for k in range(12)]
    _csv(b, rows + [(f"covid19/copy_of_c{k}.avi", f"https://www.sitecovid19{k}.org/p{k}") for k in range(6)])
    apart = load_dataset(f"{a}?folds=3&fold=0&group=source", frames_per_clip=2)
    kept = load_dataset(f"{b}?folds=3&fold=0&group=source", frames_per_clip=2)
    # kept's former hash: what a run over the same files recorded before the change (and before sources were hashed)
    old = {"hash": kept.former_hash, "name": apart.name}
    assert apart.data_hash != kept.data_hash and old["hash"] not in (apart.data_hash, apart.former_hash)
    with pytest.raises(DataError, match="changed since the model was trained"):
        require_training_data(apart, old, data_given=None, use="its test split moved", fix="retrain")


def test_bootstrap_clusters_follow_the_copy_groups(tmp_path: Path) -> None:
    """clip_source / sources (the clusters of cv.json's intervals) give a copy its original's unit."""
    ds = load_dataset(str(_copies_tree(tmp_path / "a")), frames_per_clip=1)
    for k in range(6):
        assert ds.clip_source[f"covid19/copy_of_c{k}.avi"] == ds.clip_source[f"covid19/c{k}.avi"] == \
            f"https://www.sitecovid19{k}.org/p{k}"
        assert ds.sources[f"covid19/copy_of_c{k}.avi"] == ds.sources[f"covid19/c{k}.avi"] == f"sitecovid19{k}.org"
    # A copy listed under another source joins the two sources into one unit, named by both.
    ds = load_dataset(str(_copies_tree(tmp_path / "b", listed_copy_source="https://mirror{}.example.net/again")),
                      frames_per_clip=1)
    assert ds.clip_source["covid19/copy_of_c0.avi"] == ds.clip_source["covid19/c0.avi"] == \
        "https://mirror0.example.net/again + https://www.sitecovid190.org/p0"
    assert ds.clip_source["covid19/c6.avi"] == "https://www.sitecovid190.org/p6"  # same site, another source
    # Sites: c0 and c6 share sitecovid190.org, and c0's copy brings in mirror0: one unit, transitively.
    assert ds.sources["covid19/c6.avi"] == ds.sources["covid19/copy_of_c0.avi"] == "mirror0.example.net + sitecovid190.org"
    # Clips that are neither copied nor bridged keep their own source and site, as before.
    assert ds.clip_source["regular/c1.avi"] == "https://www.siteregular1.org/p1"
    assert ds.sources["regular/c1.avi"] == "siteregular1.org"


def test_joined_sources_are_noted(tmp_path: Path) -> None:
    root = _copies_tree(tmp_path / "clips", listed_copy_source="https://mirror{}.example.net/again")
    notes = load_folds(str(root), 3, frames_per_clip=1, group="source")[0].notes
    assert any("group=source: byte-identical clips listed under different sources join 12 of them into 6 group(s)" in n
               for n in notes), notes
    # Copies without a row join their original's source: not counted as clips without one.
    notes = load_folds(str(_copies_tree(tmp_path / "b")), 3, frames_per_clip=1, group="source")[0].notes
    assert not any("without a clips.csv original_source" in n for n in notes), notes


# -- fix 2: group=source|site on the plain split, and the default's note ----------------------------------------


def _hospitals_tree(root: Path, per_source: int = 3) -> Path:
    """covid19 and regular, 12 clips each: 4 sources per class of `per_source` clips."""
    rows = []
    for cls in ("covid19", "regular"):
        for k in range(12):
            _clip(root / cls / f"c{k}.avi", 3)
            rows.append((f"{cls}/c{k}.avi", f"https://www.hospital-{cls}{k // per_source}.org/lung-cases"))
    _csv(root, rows)
    return root


@pytest.mark.parametrize("group", ["source", "site"])
def test_plain_clip_split_grouped_by_source_keeps_each_source_on_one_side(tmp_path: Path, group: str) -> None:
    root = _hospitals_tree(tmp_path / "clips")
    ds = load_dataset(f"{root}?group={group}", frames_per_clip=1)
    side = _sides(ds)
    by_unit: dict[str, set[str]] = {}
    for c, s in side.items():
        by_unit.setdefault(ds.clip_source[c], set()).add(s)
    assert all(len(s) == 1 for s in by_unit.values()), by_unit
    assert {s for ss in by_unit.values() for s in ss} == {"train", "val", "test"}
    # Recorded in the spec and the hash, so that evaluate and export rebuild this split, not the clip-grouped one.
    assert ds.spec == f"{root}?group={group}"
    plain = load_dataset(str(root), frames_per_clip=1)
    assert ds.data_hash != plain.data_hash and plain.spec == str(root)
    again = load_dataset(ds.spec, frames_per_clip=1)
    assert again.data_hash == ds.data_hash and _sides(again) == side
    assert not any("share their clips.csv original_source" in n for n in ds.notes), ds.notes


def test_plain_split_grouped_by_source_fills_its_shares_by_clips(tmp_path: Path) -> None:
    """Sources differ in size: drawing a share of the sources (not of the clips) could hold out one large source, or
    only small ones (on the lung POCUS set: 5 test clips of 87 for a 15% share)."""
    root = tmp_path / "clips"
    rows = []
    for cls in ("covid19", "regular"):
        for k in range(16):  # one source of 8 clips, 8 of one clip
            _clip(root / cls / f"c{k}.avi", 2)
            rows.append((f"{cls}/c{k}.avi", f"https://www.{cls}{max(k - 7, 0)}.org/x"))
    _csv(root, rows)
    for seed in range(4):
        ds = load_dataset(f"{root}?group=source&test=0.25&val=0.25", frames_per_clip=1, seed=seed)
        for s in ("test", "val"):  # 4 of each class's 16 clips asked for
            per_class = np.bincount(ds.splits[s].labels, minlength=2)
            assert all(3 <= n <= 5 for n in per_class), (seed, s, per_class)


def test_plain_split_grouped_by_source_keeps_copies_with_their_source(tmp_path: Path) -> None:
    root = _copies_tree(tmp_path / "clips")
    for seed in range(4):
        side = _sides(load_dataset(f"{root}?group=source", frames_per_clip=1, seed=seed))
        for k in range(6):
            assert side[f"covid19/copy_of_c{k}.avi"] == side[f"covid19/c{k}.avi"]


def test_default_plain_clip_split_notes_sources_shared_with_training(tmp_path: Path) -> None:
    """The default stays by clip (changing it would change the splits of recorded runs, under the same data hash),
    but says how many held-out clips share a source with a training clip, and what keeps sources apart."""
    root = _hospitals_tree(tmp_path / "clips")
    ds = load_dataset(str(root), frames_per_clip=1)
    side = _sides(ds)
    trained = {ds.clip_source[c] for c, s in side.items() if s == "train"}
    n = {s: (sum(1 for c, t in side.items() if t == s and ds.clip_source[c] in trained),
             sum(1 for t in side.values() if t == s)) for s in ("test", "val")}
    assert n["test"][0] + n["val"][0] > 0  # the case the note is for
    note = (f"{n['test'][0]} of {n['test'][1]} test and {n['val'][0]} of {n['val'][1]} val clip(s) share their clips.csv "
            "original_source with a training clip")
    assert any(x.startswith(note) and "group=source in the data spec keeps each source on one side" in x
               for x in ds.notes), ds.notes
    # One source per clip: nothing shared, no note.
    alone = _hospitals_tree(tmp_path / "alone", per_source=1)
    assert not any("original_source" in x for x in load_dataset(str(alone), frames_per_clip=1).notes)


def test_spec_group_without_folds_decides_a_cross_validation_over_it(tmp_path: Path) -> None:
    root = _hospitals_tree(tmp_path / "clips", per_source=2)
    dss = load_folds(f"{root}?group=site", 3, frames_per_clip=1, group="source")
    assert [ds.spec for ds in dss] == [f"{root}?folds=3&fold={i}&group=site" for i in range(3)]


def test_a_class_its_sources_keep_out_of_training_or_validation_is_refused(tmp_path: Path) -> None:
    """regular's 2 clips share a source with covid19 clips: wherever that source is drawn, both go, so training and
    validation cannot both have regular (with folds, the same is refused)."""
    root = tmp_path / "clips"
    rows = []
    for k in range(9):
        _clip(root / "covid19" / f"c{k}.avi")
        rows.append((f"covid19/c{k}.avi", f"https://www.h{k // 3}.org/x"))
    for k in range(2):
        _clip(root / "regular" / f"r{k}.avi")
        rows.append((f"regular/r{k}.avi", "https://www.h0.org/x"))
    _csv(root, rows)
    for seed in range(3):
        with pytest.raises(DataError) as exc:
            load_dataset(f"{root}?group=source", frames_per_clip=1, seed=seed)
        assert "group=source: the regular clips' 1 source(s) leave none of them in the " in _one_line(exc)
        with pytest.raises(DataError) as exc:
            load_dataset(f"{root}?group=site", frames_per_clip=1, seed=seed)
        assert "use group=source (finer)" in _one_line(exc)
    load_dataset(str(root), frames_per_clip=1)  # by clip, as before: not refused


# -- where group without folds has no meaning, it is refused ---------------------------------------------------


def test_group_without_folds_is_refused_where_it_has_no_effect(tmp_path: Path) -> None:
    from edgeclf.data import FolderOptions, check_option_table, check_spec_options, split_spec, with_options

    images = tmp_path / "images"
    for c, cls in enumerate(("a", "b")):
        (images / cls).mkdir(parents=True)
        for i in range(4):
            assert cv2.imwrite(str(images / cls / f"i{i}.png"), np.full((12, 16), 10 * i + 100 * c, np.uint8))
    with pytest.raises(DataError) as exc:
        load_dataset(f"{images}?group=source")
    assert "group=source without folds applies to clip data sets" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        check_spec_options(f"{images}?group=clip")
    assert "option group has no effect on a folder of images" in _one_line(exc)
    dirs = tmp_path / "dirs"
    for s in ("train", "test"):
        for cls in ("covid19", "regular"):
            _clip(dirs / s / cls / "c.avi")
    with pytest.raises(DataError) as exc:
        check_spec_options(f"{dirs}?group=source")
    assert "train/ val/ test/ folders, which fix the split; leave group out" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        load_dataset(f"{dirs}?group=source", frames_per_clip=1)
    assert "leave out the split, folds and group options" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        split_spec("/d?split=busi&group=source")
    assert "split and group=source exclude each other" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        check_option_table({"split", "group"}, FolderOptions(split="busi"))
    assert "group has no effect with split=busi" in _one_line(exc)
    # Cross-validation asked for outside the spec (--folds, a recipe's [train] folds) is grouped by --group.
    clips = _hospitals_tree(tmp_path / "clips")
    with pytest.raises(DataError) as exc:
        check_spec_options(f"{clips}?group=site", folds=5)
    assert "use --group" in _one_line(exc) and "folds=5&group=site" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        split_spec("/d?fold=2&group=site")
    assert "option fold applies to cross-validation" in _one_line(exc)
    # Where it has an effect it is taken and recorded.
    assert check_spec_options(f"{clips}?group=site") == "clips"
    check_option_table({"group"}, FolderOptions(group="source"))  # a recipe's [data] group = "source"
    assert split_spec("/d?group=source")[1].group == "source"
    assert with_options("/d?frames=4", group="site") == "/d?frames=4&group=site"
    assert with_options("/d?group=site", group="clip") == "/d"


# -- clips.csv sources are part of the data hash where they decide the split --------------------------------------


def _edit_source(root: Path, clip: str, source: str) -> None:
    text = (root / "clips.csv").read_text()
    old = next(line for line in text.splitlines() if line.startswith(clip + ","))
    (root / "clips.csv").write_text(text.replace(old, old.rsplit(",", 1)[0] + f',"{source}"'))


@pytest.mark.parametrize("query", ["group={}", "folds=3&fold=0&group={}"])
def test_an_edited_clips_csv_source_changes_the_hash_where_it_decides_the_split(tmp_path: Path, query: str) -> None:
    """group=source|site splits by clips.csv: an edited source re-draws the split, so the hash must change (it did not,
    and export, evaluate and prune re-drew a split in which training clips became held-out ones). group=clip (the
    default) does not read the sources for its split: its hash stays."""
    root = _hospitals_tree(tmp_path / "clips", per_source=2)

    def hashes() -> dict[str, str]:
        return {g: load_dataset(f"{root}?{query.format(g)}", frames_per_clip=1).data_hash for g in ("source", "site")} | {
            "clip": load_dataset(str(root), frames_per_clip=1).data_hash}

    before = hashes()
    _edit_source(root, "covid19/c0.avi", "https://www.hospital-covid190.org/other-page")  # same site, another source
    same_site = hashes()
    assert same_site["source"] != before["source"]
    assert same_site["site"] == before["site"] and same_site["clip"] == before["clip"]
    _edit_source(root, "covid19/c0.avi", "https://www.hospital-covid193.org/lung-cases")  # another site too
    moved = hashes()
    assert moved["source"] != same_site["source"] and moved["site"] != same_site["site"]
    assert moved["clip"] == before["clip"]


def test_a_run_recorded_before_sources_were_hashed_is_accepted_with_a_warning(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The hash earlier code gave (it did not read clips.csv: the same as the hash of the folder without one) stays the
    former hash, so runs recorded then are still accepted, with a warning that their sources could not be checked; a
    run recorded with the sources is refused once clips.csv is edited."""
    from edgeclf.data import require_training_data

    root = _hospitals_tree(tmp_path / "clips", per_source=2)
    bare = shutil.copytree(root, tmp_path / "bare")
    (bare / "clips.csv").unlink()
    for query in ("frames=1&group=source", "frames=1&folds=3&fold=0&group=site"):
        ds = load_dataset(f"{root}?{query}")
        earlier = load_dataset(f"{bare}?{query}")
        assert ds.former_hash == earlier.data_hash != ds.data_hash and earlier.former_hash is None
        with caplog.at_level("WARNING", logger="edgeclf.data"):
            caplog.clear()
            require_training_data(ds, {"hash": ds.former_hash, "name": ds.name}, data_given=None, use="x")
        assert "clips.csv sources" in caplog.text and "retrain to record them" in caplog.text, caplog.text
        caplog.clear()
        require_training_data(ds, {"hash": ds.data_hash, "name": ds.name}, data_given=None, use="x")
        assert "clips.csv" not in caplog.text
    # Without clips.csv (or grouped by clip) the hash is the one earlier code gave, and no former one is kept.
    assert load_dataset(f"{root}?frames=1").former_hash is None
    recorded = load_dataset(f"{root}?frames=1&group=source")
    _edit_source(root, "regular/c5.avi", "https://www.hospital-regular0.org/lung-cases")
    edited = load_dataset(f"{root}?frames=1&group=source")
    assert edited.former_hash == recorded.former_hash  # the files are unchanged: earlier code could not tell
    with pytest.raises(DataError) as exc:
        require_training_data(edited, {"hash": recorded.data_hash, "name": recorded.name}, data_given=None,
                              use="its test split would be re-drawn")
    assert "changed since the model was trained" in _one_line(exc)
