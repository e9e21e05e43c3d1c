"""The run's data: the training, validation and eval sources opened from ``config.data``'s SPECs (with a
``holdout:`` validation carved out of the training data), checked against the model's front end, and the
training loader, and the teacher file of knowledge distillation (``config.distill``) with the lookup that
adds each batch's teacher logits. Every problem is a ConfigError raised before anything is compiled."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from convnext_audio_jax.data import pipeline
from convnext_audio_jax.data import spec as spec_lib
from convnext_audio_jax.data import teacher as teacher_lib
from convnext_audio_jax.models.frontend import FrontendConfig
from convnext_audio_jax.training.config import ConfigError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunData:
    train: object  # clip sources (len, targets, clip_id, [i])
    validation: object
    eval: object | None
    class_names: tuple[str, ...] | None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def data_options(config, frontend: FrontendConfig) -> spec_lib.DataOptions:
    data = config.data
    return spec_lib.DataOptions(
        labels_csv=data.labels_csv, tfds_data_dir=data.tfds_data_dir,
        demo_clips={"train": data.demo_train_clips, "validation": data.demo_val_clips, "eval": data.demo_eval_clips},
        demo_sample_rate=frontend.sample_rate, demo_clip_seconds=frontend.clip_seconds, seed=config.seed)


def _open(key: str, spec: str, options: spec_lib.DataOptions, frontend: FrontendConfig) -> spec_lib.OpenedSpec:
    try:
        return spec_lib.open_for_model(spec, options, frontend, where=f"data.{key}")
    except spec_lib.ClipFormatError as error:
        raise ConfigError(str(error)) from None  # it names data.KEY already
    except spec_lib.SpecError as error:
        raise ConfigError(f"data.{key}: {error}") from None


def open_run_data(config, frontend: FrontendConfig) -> RunData:
    """The sources of ``config.data.train``, ``.validation`` (a SPEC or ``holdout:N``/``holdout:P%``) and
    ``.eval`` ("" for none); their class counts must agree."""
    options = data_options(config, frontend)
    train = _open("train", config.data.train, options, frontend)
    train_source = train.source
    try:
        holdout = spec_lib.parse_holdout(config.data.validation)
        if holdout is not None:
            train_source, validation = spec_lib.split_holdout(train.source, config.data.validation)
        else:
            validation = _open("validation", config.data.validation, options, frontend).source
    except spec_lib.SpecError as error:
        raise ConfigError(f"data.validation: {error}") from None
    evaluation = _open("eval", config.data.eval, options, frontend).source if config.data.eval else None
    for key, source in (("validation", validation), ("eval", evaluation)):
        if source is not None and source.num_classes != train_source.num_classes:
            raise ConfigError(f"data.{key} has {source.num_classes} classes, data.train {train_source.num_classes}")
    return RunData(train_source, validation, evaluation, train.class_names)


def make_train_loader(config, source, examples_per_host: int, mixup: bool) -> pipeline.ClipLoader:
    return pipeline.make_loader(source, pipeline.LoaderConfig(
        batch_size=examples_per_host,
        sampling=config.data.sampling,
        seed=config.seed,
        draws_per_example=2 if mixup else 1,
        waveform_dtype="int16",
        worker_count=config.data.worker_count,
        read_threads=config.data.read_threads,
    ))


def open_teacher(config, train_source) -> tuple[teacher_lib.TeacherPredictions | None, object, int]:
    """``(teacher, training source, clips without a teacher row)`` for ``config.distill`` (teacher None when
    ``distill.teacher`` is "").

    The teacher file must score the training data's classes and hold a row for every training clip: a
    missing row is a ConfigError naming the first missing ids, or, with ``distill.allow_missing``, those
    clips are left out of the training source (their number is returned, to be logged). Checked over all
    clip ids before training, so no step meets a missing row."""
    if not config.distill.teacher:
        return None, train_source, 0
    path = config.distill.teacher
    try:
        teacher = teacher_lib.TeacherPredictions(path)
    except teacher_lib.TeacherFileError as error:
        raise ConfigError(f"distill.teacher: {error}") from None
    if teacher.num_classes != train_source.num_classes:
        raise ConfigError(f"distill.teacher {path} scores {teacher.num_classes} classes, data.train has "
                          f"{train_source.num_classes}")
    ids = [train_source.clip_id(i) for i in range(len(train_source))]
    found = teacher.find_rows(ids) >= 0
    missing = len(ids) - int(found.sum())
    if missing and not config.distill.allow_missing:
        try:
            teacher.require(ids)
        except teacher_lib.MissingTeacherError as error:
            raise ConfigError(f"distill.teacher: {error}") from None
    if missing:
        if not found.any():
            raise ConfigError(f"distill.teacher {path} has no row for any of the {len(ids)} training clips "
                              f"(first id: {ids[0]}); was it made for this data SPEC?")
        first = ", ".join(ids[i] for i in np.flatnonzero(~found)[:teacher_lib.MISSING_IDS_SHOWN])
        logger.warning("distill.allow_missing: %d of %d training clips have no row in %s and are skipped "
                       "(first: %s)", missing, len(ids), path, first)
        train_source = spec_lib.SubsetSource(train_source, np.flatnonzero(found))
    return teacher, train_source, missing


def add_teacher_logits(batch: dict, teacher: teacher_lib.TeacherPredictions | None) -> dict:
    """The loader batch with "teacher": the (R, C) float32 teacher logits of its clips, looked up by "id"
    (each clip's own row: speed perturbation, SpecAugment and mixup happen later, on the device)."""
    if teacher is None:
        return batch
    logits, _ = teacher.lookup(batch["id"])
    return {**batch, "teacher": logits}
