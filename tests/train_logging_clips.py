"""``python tests/train_logging_clips.py --clip_log=DIR TRAIN_FLAGS...``: ``train.py`` that also appends the clip
ids of every training batch each process read to ``DIR/clips-process<I>.jsonl`` (``{"step", "ids"}`` lines), through
``training.train``'s ``on_batch``. tests/test_training_multiprocess.py checks with it which clips each process of a
job trained on; the training entry itself has no such switch."""

if __name__ == "__main__":  # first, as in train.py: it may run this command again with glibc's allocator set
    from convnext_audio_jax.runtime import host_memory

    host_memory.keep_freed_memory()

import json
import os
import sys

import jax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's train.py
import train

_CLIP_LOG = flags.DEFINE_string("clip_log", None, "folder of the clips-process<I>.jsonl files")
flags.mark_flag_as_required("clip_log")


class ClipLog:
    """The ``on_batch`` callback: opens this process's file at the first step (the process index is known once
    train.py has joined the job)."""

    def __init__(self):
        self._file = None

    def __call__(self, step: int, ids) -> None:
        if self._file is None:
            path = os.path.join(_CLIP_LOG.value, f"clips-process{jax.process_index()}.jsonl")
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (open for the whole run)
        self._file.write(json.dumps({"step": step, "ids": ids.tolist()}) + "\n")
        self._file.flush()


def main(argv):
    return train.main(argv, on_batch=ClipLog())


if __name__ == "__main__":
    app.run(main, flags_parser=train.parse_flags)
