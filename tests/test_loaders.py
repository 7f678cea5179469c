"""Every loader against small fixture files in the real corpora's formats, and their bad-input errors."""

import numpy as np
import pytest

from corpus_fixtures import write_deam, write_emotic, write_iaps, write_naps, write_pmemo
from imem.data.images import load_images
from imem.data.music import load_music
from imem.data.pairs import read_pair_list
from imem.errors import ImemError


@pytest.mark.parametrize("ext", ["wav", "mp3"])
def test_deam_static_dynamic_and_audio(tmp_path, ext):
    rng = np.random.default_rng(1)
    info = write_deam(tmp_path / "DEAM", {"2": 45.0, "7": 45.0, "2010": 70.0}, rng, ext=ext)
    src = load_music(tmp_path, {"format": "deam", "dir": "DEAM"})
    assert src.dynamic.song_ids == ["2", "7", "2010"]
    assert src.dynamic.times_ms[0] == 15000 and src.dynamic.step_ms == 500
    np.testing.assert_allclose(src.dynamic.valence[1], info["dyn"][("valence", "7")], equal_nan=True)
    # past a 45-s song's end the long song's columns are empty -> NaN
    assert np.isnan(src.dynamic.arousal[0, -1]) and np.isfinite(src.dynamic.arousal[2, -1])
    np.testing.assert_allclose(src.songs["duration_s"], [45.0, 45.0, 70.0], atol=0.06)
    assert src.songs["audio_path"].str.endswith(f".{ext}").all()
    assert src.scale == (-1.0, 1.0)


def test_deam_files_found_in_the_distribution_tree(tmp_path):
    rng = np.random.default_rng(2)
    write_deam(tmp_path / "stage", {"3": 45.0}, rng)
    deep = tmp_path / "DEAM" / "annotations" / "annotations averaged per song" / "song_level"
    deep.mkdir(parents=True)
    (tmp_path / "stage" / "annotations").rename(deep / "x")
    (tmp_path / "stage" / "MEMD_audio").rename(tmp_path / "DEAM" / "MEMD_audio")
    src = load_music(tmp_path, {"format": "deam", "dir": "DEAM"})
    assert src.dynamic.song_ids == ["3"]


def test_pmemo(tmp_path):
    rng = np.random.default_rng(3)
    dyn = write_pmemo(tmp_path / "PMEmo", {"1": 40.0, "4": 35.0}, rng)
    src = load_music(tmp_path, {"format": "pmemo", "dir": "PMEmo"})
    assert src.dynamic.times_ms[0] == 15500 and src.scale == (0.0, 1.0)
    t, v, a = dyn["4"]
    np.testing.assert_allclose(src.dynamic.valence[1, : len(t)], v)
    assert src.songs["duration_s"].iloc[0] == pytest.approx(40.0, abs=0.1)


def test_iaps_decimal_ids_and_upper_case_extension(tmp_path):
    rng = np.random.default_rng(4)
    write_iaps(tmp_path / "IAPS", {"2352.1": (7.1, 3.2), "7033": (4.5, 2.0), "1050": (3.0, 6.5)}, rng,
               upper=("7033",))
    df = load_images(tmp_path, [{"format": "iaps", "dir": "IAPS"}])
    row = df.set_index("image_id").loc["2352.1"]
    assert (row["valence"], row["arousal"]) == (7.1, 3.2)
    assert df.set_index("image_id").loc["7033", "path"].endswith("7033.JPG")
    assert set(df["source"]) == {"iaps"}


def test_naps_and_configurable_columns(tmp_path):
    rng = np.random.default_rng(5)
    write_naps(tmp_path / "NAPS", {"Animals_039_h": (6.5, 4.0), "Faces_001_v": (2.5, 7.0)}, rng)
    df = load_images(tmp_path, [{"format": "naps", "dir": "NAPS"}]).set_index("image_id")
    assert df.loc["Faces_001_v", "arousal"] == 7.0
    with pytest.raises(ImemError, match="missing column 'Valence_mean'"):
        load_images(tmp_path, [{"format": "naps", "dir": "NAPS", "valence_column": "Valence_mean"}])


def test_emotic_mean_over_people_and_annotators(tmp_path):
    rng = np.random.default_rng(6)
    imgs = {"COCO_train2014_000000318807": [[(8, 2)], [(6, 4)]],      # two people, one annotator each
            "frame_abcdefghijklmnop": [[(1, 10), (3, 6), (5, 5)]]}     # one person, three annotators
    write_emotic(tmp_path / "EMOTIC", imgs, rng, parts={"train": ["COCO_train2014_000000318807"],
                                                         "val": ["frame_abcdefghijklmnop"]})
    df = load_images(tmp_path, [{"format": "emotic", "dir": "EMOTIC"}]).set_index("image_id")
    assert df.loc["COCO_train2014_000000318807", ["valence", "arousal"]].tolist() == [7.0, 3.0]
    assert df.loc["frame_abcdefghijklmnop", ["valence", "arousal"]].tolist() == [3.0, 7.0]
    assert df.loc["frame_abcdefghijklmnop", "path"].endswith("mscoco/images/frame_abcdefghijklmnop.jpg")


def test_imemnet_pair_list(tmp_path):
    p = tmp_path / "val_matching.txt"
    p.write_text("1967-11 COCO_train2014_000000318807 0.8757995366765425\n238-12 2352.1 0.5\n")
    df = read_pair_list(p)
    assert df["clip_id"].tolist() == ["1967-11", "238-12"]
    assert df["song_id"].tolist() == ["1967", "238"]
    assert df["score"].iloc[0] == pytest.approx(0.8757995366765425)


# --- bad input: one line naming the file / id / column ---------------------------------------------

def test_deam_label_outside_scale(tmp_path):
    write_deam(tmp_path / "DEAM", {"5": 45.0}, np.random.default_rng(7))
    f = tmp_path / "DEAM" / "annotations" / "arousal.csv"
    lines = f.read_text().splitlines()
    cells = lines[1].split(",")
    cells[3] = "1.7"
    f.write_text("\n".join([lines[0], ",".join(cells)]) + "\n")
    with pytest.raises(ImemError, match=r"arousal.csv: song 5: sample_16000ms = 1.7 is outside the scale \[-1.0, 1.0\]"):
        load_music(tmp_path, {"format": "deam", "dir": "DEAM"})


def test_deam_nan_static_label(tmp_path):
    write_deam(tmp_path / "DEAM", {"5": 45.0}, np.random.default_rng(8))
    f = tmp_path / "DEAM" / "annotations" / "static_annotations_averaged_songs_1_2000.csv"
    f.write_text("song_id, valence_mean, valence_std, arousal_mean, arousal_std\n5, NaN, 1, 4, 1\n")
    with pytest.raises(ImemError, match=r"id 5: valence_mean = .* missing or not a number"):
        load_music(tmp_path, {"format": "deam", "dir": "DEAM"})


def test_missing_and_unreadable_audio(tmp_path):
    write_deam(tmp_path / "DEAM", {"5": 45.0, "6": 45.0}, np.random.default_rng(9))
    (tmp_path / "DEAM" / "MEMD_audio" / "6.wav").write_bytes(b"not audio at all")
    with pytest.raises(ImemError, match=r"unreadable audio file .*6\.wav"):
        load_music(tmp_path, {"format": "deam", "dir": "DEAM"})
    (tmp_path / "DEAM" / "MEMD_audio" / "6.wav").unlink()
    with pytest.raises(ImemError, match=r"DEAM: song 6: audio file not found"):
        load_music(tmp_path, {"format": "deam", "dir": "DEAM"})
    # without media checks the labels still load
    assert load_music(tmp_path, {"format": "deam", "dir": "DEAM"}, check_media=False).dynamic.song_ids == ["5", "6"]


def test_missing_and_corrupt_image(tmp_path):
    rng = np.random.default_rng(10)
    write_iaps(tmp_path / "IAPS", {"1000": (5.0, 5.0), "1001": (4.0, 4.0)}, rng)
    (tmp_path / "IAPS" / "images" / "1001.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ImemError, match=r"unreadable image file .*1001\.jpg"):
        load_images(tmp_path, [{"format": "iaps", "dir": "IAPS"}])
    (tmp_path / "IAPS" / "images" / "1001.jpg").unlink()
    with pytest.raises(ImemError, match=r"IAPS: image 1001: file not found"):
        load_images(tmp_path, [{"format": "iaps", "dir": "IAPS"}])


def test_emotic_label_outside_scale(tmp_path):
    write_emotic(tmp_path / "EMOTIC", {"sun_aaaaaaaaaaaaaaaa": [[(11, 3)]]}, np.random.default_rng(11))
    with pytest.raises(ImemError, match=r"image sun_aaaaaaaaaaaaaaaa: valence = 11.0 is outside the scale \[1, 10\]"):
        load_images(tmp_path, [{"format": "emotic", "dir": "EMOTIC"}])


def test_unknown_source_option_and_format(tmp_path):
    with pytest.raises(ImemError, match=r"unknown key 'prepare.images\[0\].ratingz'"):
        load_images(tmp_path, [{"format": "iaps", "dir": "IAPS", "ratingz": "x"}])
    with pytest.raises(ImemError, match=r"prepare.music.format = 'gtzan' is not one of"):
        load_music(tmp_path, {"format": "gtzan"})


def test_pair_list_bad_lines(tmp_path):
    p = tmp_path / "test_matching.txt"
    p.write_text("1967-11 7033 0.5\n1967-12 7033 1.5\n")
    with pytest.raises(ImemError, match=r"test_matching.txt:2: score 1.5 is outside \[0, 1\]"):
        read_pair_list(p)
    p.write_text("1967_11 7033 0.5\n")
    with pytest.raises(ImemError, match=r"test_matching.txt:1: malformed clip id"):
        read_pair_list(p)
