"""Image folders: scan's classes and samples, scan_pair's class check, and each bad-input case as a
one-line DataError (missing folder, no classes, empty class, mismatched classes, corrupt files)."""
import pytest

from image_folders import corrupt_jpeg, make_folder
from milenas_fast.errors import DataError
from milenas_fast.data.imagefolder import scan, scan_pair


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_scan_lists_classes_and_samples_sorted(tmp_path):
    root = make_folder(tmp_path / "train", classes=("b", "a", "c"), per_class=3)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".hidden.jpg").write_bytes(b"x")
    (root / "c" / "sub").mkdir()
    (root / "b" / "img0.jpg").rename(root / "c" / "sub" / "deep.JPG")  # nested, upper-case suffix
    classes, samples = scan(root)
    assert classes == ["a", "b", "c"]
    labels = [label for _, label in samples]
    assert labels == sorted(labels) and labels.count(0) == 3 and labels.count(1) == 2 and labels.count(2) == 4
    assert any(p.endswith("img2.png") for p, _ in samples)
    assert any(p.endswith("deep.JPG") and label == 2 for p, label in samples)
    assert not any(p.endswith((".txt", ".hidden.jpg")) for p, _ in samples)
    assert scan(root, check="decode") == (classes, samples)  # the generated files are all sound


def test_scan_pair(tmp_path):
    make_folder(tmp_path / "train", per_class=2)
    make_folder(tmp_path / "val", per_class=1, seed=1)
    classes, train, val = scan_pair(tmp_path / "train", tmp_path / "val", check="verify")
    assert classes == ["ant", "bee", "cat"] and len(train) == 6 and len(val) == 3


def test_missing_folder(tmp_path):
    assert "does not exist" in one_line_error(scan, tmp_path / "nope")


def test_no_class_folders(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    assert "no class folders" in one_line_error(scan, tmp_path)


def test_empty_class(tmp_path):
    make_folder(tmp_path, per_class=1)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("")
    msg = one_line_error(scan, tmp_path)
    assert "dog" in msg and "no images" in msg


def test_mismatched_classes(tmp_path):
    make_folder(tmp_path / "train", classes=("ant", "bee", "cat"), per_class=1)
    make_folder(tmp_path / "val", classes=("ant", "bee", "dog"), per_class=1)
    msg = one_line_error(scan_pair, tmp_path / "train", tmp_path / "val")
    assert "only in train cat" in msg and "only in val dog" in msg


def test_corrupt_files(tmp_path):
    root = make_folder(tmp_path, per_class=2, png=False, gray=False)
    corrupt_jpeg(root / "bee" / "img1.jpg", "truncated")
    scan(root)  # no check: not opened
    scan(root, check="verify")  # a truncated JPEG keeps a valid header
    msg = one_line_error(scan, root, check="decode")
    assert "bee/img1.jpg" in msg and "corrupt" in msg
    corrupt_jpeg(root / "ant" / "img0.jpg", "garbage")
    msg = one_line_error(scan, root, check="verify")
    assert "ant/img0.jpg" in msg and "and 1 more" not in msg
    msg = one_line_error(scan, root, check="decode")
    assert "ant/img0.jpg" in msg and "(and 1 more)" in msg
