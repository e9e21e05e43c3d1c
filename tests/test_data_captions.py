"""Caption SPECs: the captioned demo set, Clotho's and AudioCaps' CSV layouts over an audio folder, and their
one-line errors."""

import numpy as np
import pytest
import soundfile

from convnext_audio_jax.data import captions, demo


def test_demo_captions_name_each_event_with_varied_words():
    clips = captions.open_captions("demo-captions@validation", demo_clips=40, seed=3)
    assert len(clips) == 40 and all(len(c) == captions.CLOTHO_CAPTIONS for c in clips.captions)
    targets = demo.SyntheticAudioSet("validation", 40, seed=3).targets
    for labels, texts in zip(targets, clips.captions):
        for text in texts:
            lowered = text.lower()
            for i in np.flatnonzero(labels):  # every event is named by one of its synonyms
                assert any(noun in lowered for noun in captions._DEMO_WORDS[demo.CLASS_NAMES[i]][0]), (text, i)
        assert len(set(texts)) > 1  # five different sentences of the same clip
    again = captions.open_captions("demo-captions@validation", demo_clips=40, seed=3)
    assert again.captions == clips.captions and again.clip_ids == clips.clip_ids
    waveform = clips.read(0, 16_000)
    assert waveform.dtype == np.float32 and waveform.shape == (16_000,) and np.abs(waveform).max() <= 1.0
    assert clips.read(0, 8_000).shape == (8_000,)
    texts, owner = clips.all_captions()
    assert len(texts) == 200 and list(owner[:6]) == [0, 0, 0, 0, 0, 1]


def _wav(path, seconds=0.5, rate=16_000):
    soundfile.write(path, np.zeros(int(seconds * rate), np.float32), rate)


def test_clotho_and_audiocaps_csvs_over_a_folder(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in ("rain.wav", "dog.wav", "abc_30.wav"):
        _wav(audio / name)
    clotho = tmp_path / "clotho.csv"
    clotho.write_text("file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
                      "rain.wav,rain falls,it rains,rain on a roof,heavy rain,a storm\n"
                      'dog.wav,"a dog barks, twice",a dog,barking,a hound,woof\n')
    clips = captions.open_captions(f"clotho:{audio}@{clotho}")
    assert clips.clip_ids == ["rain.wav", "dog.wav"] and clips.captions[1][0] == "a dog barks, twice"
    assert clips.read(1, 8_000).shape == (4_000,)
    caps = tmp_path / "val.csv"
    caps.write_text("audiocap_id,youtube_id,start_time,caption\n1,abc,30,a man talks\n2,abc,30.0,speech\n")
    clips = captions.open_captions(f"audiocaps:{audio}@{caps}")
    assert clips.clip_ids == ["abc_30"] and clips.captions == [["a man talks", "speech"]]


def test_caption_spec_errors_are_one_line(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    _wav(audio / "rain.wav")
    bad = tmp_path / "bad.csv"
    bad.write_text("file_name,caption_1\nrain.wav,rain\n")
    cases = [("nonsense", "is none of"), ("demo-captions@test", "splits are"),
             (f"clotho:{tmp_path}/nowhere@{bad}", "does not exist"),
             (f"clotho:{audio}@{bad}", "no column caption_2"),
             (f"clotho:{audio}@{tmp_path}/missing.csv", "is not a file")]
    for spec, expected in cases:
        with pytest.raises(captions.CaptionSpecError, match=expected) as info:
            captions.open_captions(spec)
        assert "\n" not in str(info.value)
    lost = tmp_path / "lost.csv"
    lost.write_text("audiocap_id,youtube_id,start_time,caption\n1,zzz,0,a car\n")
    with pytest.raises(captions.CaptionSpecError, match="1 of 1 clips .* no file .*'zzz_0'"):
        captions.open_captions(f"audiocaps:{audio}@{lost}")
