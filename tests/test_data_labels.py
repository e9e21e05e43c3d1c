import numpy as np
import pytest

from convnext_audio_jax.data import labels
from data_helpers import CLASSES, write_class_labels, write_segments_csv


@pytest.fixture
def class_labels(tmp_path):
    return labels.read_class_labels(write_class_labels(tmp_path / "class_labels_indices.csv"))


def test_class_labels_keep_quoted_names_with_commas(class_labels):
    assert class_labels.num_classes == len(CLASSES)
    assert class_labels.display_names[1] == "Male speech, man speaking"
    assert class_labels.display_names[4] == 'Squeak, "creak"'
    assert class_labels.index("/m/04rlf") == 2
    assert class_labels.index("Male speech, man speaking") == 1
    np.testing.assert_array_equal(class_labels.multi_hot([0, 3]), [1, 0, 0, 1, 0])
    with pytest.raises(KeyError, match="/m/nope"):
        class_labels.index("/m/nope")


def test_class_labels_reject_bad_header_and_gaps(tmp_path):
    bad_header = tmp_path / "a.csv"
    bad_header.write_text("id,mid,name\n0,/m/a,A\n")
    with pytest.raises(labels.LabelFileError, match="index,mid,display_name"):
        labels.read_class_labels(bad_header)
    gap = tmp_path / "b.csv"
    gap.write_text("index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n")
    with pytest.raises(labels.LabelFileError, match="line 3: expected index 1"):
        labels.read_class_labels(gap)


def test_segments_csv_with_comment_lines_and_quoted_multi_labels(tmp_path, class_labels):
    path = write_segments_csv(tmp_path / "balanced_train_segments.csv", [
        ("--PJHxphWEs", 30.0, 40.0, ["/m/09x0r", "/m/05zppz"]),
        ("-0DdlOuIFUI", 50.0, 60.0, ["/m/04rlf"]),
        ("-0RWZT-miFs", 420.0, 430.0, ["/m/0jbk", "/m/07q6cd_", "/m/09x0r"]),
    ])
    entries = labels.read_segments_csv(path, class_labels)
    assert [e.clip_id for e in entries] == ["--PJHxphWEs", "-0DdlOuIFUI", "-0RWZT-miFs"]
    assert entries[0].class_indices == (0, 1)
    assert entries[2].class_indices == (0, 3, 4)
    assert (entries[2].start, entries[2].end) == ("420.000", "430.000")
    matrix = labels.multi_hot_matrix(entries, class_labels.num_classes)
    assert matrix.dtype == bool and matrix.sum() == 6
    assert labels.read_clip_list(path, class_labels) == entries


def test_segments_csv_errors_name_file_and_line(tmp_path, class_labels):
    path = write_segments_csv(tmp_path / "s.csv", [("a", 0, 10, ["/m/09x0r"]), ("b", 0, 10, ["/m/unknown"])])
    with pytest.raises(labels.LabelFileError, match=r"s\.csv, line 5: unknown class '/m/unknown'"):
        labels.read_segments_csv(path, class_labels)
    duplicate = write_segments_csv(tmp_path / "d.csv", [("a", 0, 10, ["/m/09x0r"]), ("a", 0, 10, ["/m/04rlf"])])
    with pytest.raises(labels.LabelFileError, match="appears twice"):
        labels.read_segments_csv(duplicate, class_labels)
    short = tmp_path / "short.csv"
    short.write_text("# x\nabc, 0.0, 10.0\n")
    with pytest.raises(labels.LabelFileError, match="expected 4 fields"):
        labels.read_segments_csv(short, class_labels)


def test_path_labels_csv(tmp_path, class_labels):
    path = tmp_path / "mine.csv"
    path.write_text(
        "path,labels\n"
        'dogs/bark.wav,"Animal;Male speech, man speaking"\n'
        'music/a.flac,"/m/04rlf,/m/09x0r"\n'
        'x.ogg,"Male speech, man speaking"\n'
    )
    entries = labels.read_clip_list(path, class_labels)
    assert [e.relative_path for e in entries] == ["dogs/bark.wav", "music/a.flac", "x.ogg"]
    assert entries[0].class_indices == (1, 3)
    assert entries[1].class_indices == (0, 2)
    assert entries[2].class_indices == (1,)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,labels\na.wav,Nonsense\n")
    with pytest.raises(labels.LabelFileError, match="bad.csv, line 2: unknown class 'Nonsense'"):
        labels.read_path_labels_csv(bad, class_labels)


def test_audioset_class_list_ships_with_the_package():
    audioset = labels.audioset_class_labels()
    assert audioset.num_classes == 527 and len(set(audioset.display_names)) == 527
    # Rows of AudioSet's class_labels_indices.csv, the order of the released models' outputs.
    for index, mid, name in [(0, "/m/09x0r", "Speech"), (1, "/m/05zppz", "Male speech, man speaking"),
                             (74, "/m/0bt9lr", "Dog"), (137, "/m/04rlf", "Music"), (500, "/m/028v0c", "Silence"),
                             (433, "/g/122z_qxw", "Firecracker"), (526, "/m/07hvw1", "Field recording")]:
        assert (audioset.mids[index], audioset.display_names[index]) == (mid, name)
        assert audioset.index(mid) == index and audioset.index(name) == index
    assert all(mid.startswith(("/m/", "/t/", "/g/")) for mid in audioset.mids)
    assert labels.audioset_class_labels() is audioset  # read once
