"""The TFDS `audioset` builder: ArrayRecord files of 10 s, 32 kHz clips from the user's own downloads.

Works without TensorFlow (features are `Text` and `Tensor`, the file format is ArrayRecord). On one host it runs
as a plain generator; given Beam options (`DownloadConfig(beam_runner=...|beam_options=...)`, or
`tfds build --beam_pipeline_options=...`) the same clips are decoded by an Apache Beam pipeline, for a cluster.

manual_dir layout (see MANUAL_DOWNLOAD_INSTRUCTIONS): `class_labels_indices.csv`, the segment CSVs of the splits
to build, and the audio files anywhere below it, named `{YTID}_{start}_{end}.{ext}` or `Y{YTID}.{ext}`.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from convnext_audio_jax.data import audio, sources
from convnext_audio_jax.data import labels as labels_lib

logger = logging.getLogger(__name__)

SPLIT_CSVS = {
    "balanced_train": "balanced_train_segments.csv",
    "unbalanced_train": "unbalanced_train_segments.csv",
    "eval": "eval_segments.csv",
}
LABELS_CSV = "class_labels_indices.csv"


class AudioSetConfig(tfds.core.BuilderConfig):
    """`waveform_encoding`: "int16" stores raw samples (640 kB a clip), "flac" stores a FLAC file (about half)."""

    def __init__(self, *, waveform_encoding: str, **kwargs):
        super().__init__(**kwargs)
        self.waveform_encoding = waveform_encoding


class Audioset(tfds.core.GeneratorBasedBuilder):
    """AudioSet clips at 32 kHz, 10 s, mono, with their class indices; registered in TFDS as `audioset`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "ArrayRecord clips at 32 kHz (int16 or FLAC), label indices, clip ids."}
    BUILDER_CONFIGS = [
        AudioSetConfig(name="int16", description="raw int16 waveforms", waveform_encoding="int16"),
        AudioSetConfig(name="flac", description="FLAC-compressed waveforms", waveform_encoding="flac"),
    ]
    DEFAULT_CONFIG_NAME = "int16"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Put in manual_dir: `{LABELS_CSV}` (index,mid,display_name), the segment CSVs of the splits you want
    ({', '.join(SPLIT_CSVS.values())}; a split whose CSV is absent is not built), and your downloaded clips
    anywhere below manual_dir, named `{{YTID}}_{{start}}_{{end}}.{{ext}}` (as in the CSV, in integer seconds or in
    milliseconds) or `Y{{YTID}}.{{ext}}`, in any format soundfile or librosa reads. Missing and corrupt clips are
    skipped and logged.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        if self.builder_config.waveform_encoding == "flac":
            waveform = tfds.features.Tensor(shape=(), dtype=np.object_)
        else:
            waveform = tfds.features.Tensor(shape=(audio.CLIP_SAMPLES,), dtype=np.int16)
        return tfds.core.DatasetInfo(
            builder=self,
            description="AudioSet clips resampled to 32 kHz mono and padded/cropped to 10 s.",
            features=tfds.features.FeaturesDict({
                "clip_id": tfds.features.Text(),
                "waveform": waveform,
                "label_indices": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            }),
            homepage="https://research.google.com/audioset/",
        )

    def _download_and_prepare(self, dl_manager, download_config):
        # Beam is used only when asked for: the generator path needs no apache-beam.
        self._use_beam = download_config.beam_runner is not None or download_config.beam_options is not None
        return super()._download_and_prepare(dl_manager, download_config)

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        labels_path = os.path.join(manual_dir, LABELS_CSV)
        if not os.path.isfile(labels_path):
            raise FileNotFoundError(f"{labels_path} not found. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        class_labels = labels_lib.read_class_labels(labels_path)
        folder_index = sources.index_audio_folder(manual_dir)
        generators = {}
        for split, csv_name in SPLIT_CSVS.items():
            csv_path = os.path.join(manual_dir, csv_name)
            if not os.path.isfile(csv_path):
                continue
            clips = [
                (entry.clip_id, sources.find_clip_file(entry, folder_index), list(entry.class_indices))
                for entry in labels_lib.read_segments_csv(csv_path, class_labels)
            ]
            generators[split] = self._generate_examples(clips)
        if not generators:
            raise FileNotFoundError(f"{manual_dir} holds none of {list(SPLIT_CSVS.values())}")
        return generators

    def _generate_examples(self, clips):
        encoding = self.builder_config.waveform_encoding
        if getattr(self, "_use_beam", False):
            beam = tfds.core.lazy_imports.apache_beam
            return beam.Create(clips) | beam.FlatMap(_beam_example, encoding)
        return _generator(clips, encoding)


def _generator(clips, encoding):
    for clip in clips:
        example = make_example(clip, encoding)
        if example is not None:
            yield example


def _beam_example(clip, encoding):
    beam = tfds.core.lazy_imports.apache_beam
    try:
        example = _decode_example(clip, encoding)
    except audio.ClipError as error:
        beam.metrics.Metrics.counter("audioset", f"skipped {error.reason}").inc()
        logger.warning("skipped clip %s: %s (%s)", error.clip_id, error.reason, error.detail)
        return []
    beam.metrics.Metrics.counter("audioset", "clips").inc()
    return [example]


def make_example(clip, encoding: str):
    """(key, features) for one (clip_id, path, class_indices) row, or None (logged) when the clip is unusable."""
    try:
        return _decode_example(clip, encoding)
    except audio.ClipError as error:
        logger.warning("skipped clip %s: %s (%s)", error.clip_id, error.reason, error.detail)
        return None


def _decode_example(clip, encoding: str):
    clip_id, path, class_indices = clip
    if path is None:
        raise audio.ClipError(clip_id, audio.MISSING, "no matching file in manual_dir")
    waveform = audio.load_clip(path, clip_id)
    if encoding == "flac":
        stored = audio.encode_flac(waveform, audio.SAMPLE_RATE)
    else:
        stored = waveform
    return clip_id, {
        "clip_id": clip_id,
        "waveform": stored,
        "label_indices": np.asarray(class_indices, dtype=np.int32),
    }


def main(argv=None) -> int:
    """`python -m convnext_audio_jax.data.tfds_builder`: build the dataset, on Beam when --beam-options is given.

    (The `tfds build` command needs TensorFlow; this entry point does not.)
    """
    import argparse
    import shlex

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--manual-dir", required=True, help="CSVs and clips, see MANUAL_DOWNLOAD_INSTRUCTIONS")
    parser.add_argument("--data-dir", required=True, help="where TFDS writes audioset/<config>/<version>/")
    parser.add_argument("--config", choices=[c.name for c in Audioset.BUILDER_CONFIGS], default="int16")
    parser.add_argument("--beam-options", default=None,
                        help='Beam pipeline flags, given as --beam-options="...", e.g. "--runner=DataflowRunner --project=P --region=R '
                             '--temp_location=gs://B/tmp --requirements_file=req.txt"; '
                             '"--runner=DirectRunner" runs Beam locally')
    args = parser.parse_args(argv)
    beam_options = None
    if args.beam_options:
        beam = tfds.core.lazy_imports.apache_beam
        beam_options = beam.options.pipeline_options.PipelineOptions(flags=shlex.split(args.beam_options))
    builder = Audioset(data_dir=args.data_dir, config=args.config)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir, beam_options=beam_options),
    )
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples} clips in {info.num_shards} shards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
