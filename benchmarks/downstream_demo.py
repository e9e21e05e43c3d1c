"""The downstream demos' results against their baselines, from finished runs' workdirs: a table.

Retrieval (configs/retrieval_demo.py, one workdir per variant): validation text→audio mAP@10 and R@1/R@10 of
the trained projection, of the random projection (the run's step 0) and of chance (a random ranking of the
validation clips). Captioning (configs/captioning_demo.py): the run's best validation CIDEr-D, BLEU-4, ROUGE-L
against the best constant caption, i.e. the one of the --candidates most frequent training captions that
scores the highest CIDEr-D when given for every validation clip. Also the runs' training steps/s.
Run: python benchmarks/downstream_demo.py --retrieval plain=workdir/retrieval_demo tags=workdir/retrieval_tags
     --captioning workdir/captioning_demo
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections import Counter

from common import cpu_model_name, cpu_speed_flags

from convnext_audio_jax.data import captions as captions_lib
from convnext_audio_jax.downstream import caption_metrics, metrics


def _records(workdir: pathlib.Path) -> tuple[dict, list[dict]]:
    config = json.loads((workdir / "config.json").read_text())
    return config, [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _rate(records: list[dict]) -> float:
    return [r["steps_per_second"] for r in records if "steps_per_second" in r][-1]


def retrieval_rows(runs: list[str]) -> None:
    print(f"{'retrieval (t2a, validation)':34} {'mAP@10':>8} {'R@1':>8} {'R@10':>8} {'a2t mAP@10':>11} {'steps/s':>8}")
    for name, path in (run.split("=", 1) for run in runs):
        config, records = _records(pathlib.Path(path))
        evaluations = [r for r in records if "val_t2a_mAP@10" in r]
        clips = int(config["data"]["demo_val_clips"])
        if name == runs[0].split("=", 1)[0]:
            chance = metrics.chance_t2a_map_at_10(clips)
            print(f"{f'chance ({clips} clips)':34} {chance:8.4f} {1 / clips:8.4f} {min(10, clips) / clips:8.4f}")
        for label, record in ((f"{name}: random projection", evaluations[0]),
                              (f"{name}: trained, step {evaluations[-1]['step']}", evaluations[-1])):
            print(f"{label:34} {record['val_t2a_mAP@10']:8.4f} {record['val_t2a_R@1']:8.4f} "
                  f"{record['val_t2a_R@10']:8.4f} {record['val_a2t_mAP@10']:11.4f} "
                  f"{_rate(records) if 'trained' in label else float('nan'):8.1f}")


def captioning_rows(path: str, candidates: int) -> None:
    config, records = _records(pathlib.Path(path))
    data = config["data"]
    train = captions_lib.open_captions(data["train"], demo_clips=int(data["demo_train_clips"]), seed=config["seed"])
    val = captions_lib.open_captions(data["validation"], demo_clips=int(data["demo_val_clips"]), seed=config["seed"])
    common = Counter(caption_metrics.tokenize(t) for t in train.all_captions()[0]).most_common(candidates)
    scored = [(caption_metrics.caption_metrics([text] * len(val), val.captions), text) for text, _ in common]
    constant, text = max(scored, key=lambda item: item[0]["CIDEr_D"])
    best = max((r for r in records if "val_CIDEr_D" in r), key=lambda r: r["val_CIDEr_D"])
    print(f"\n{'captioning (validation)':44} {'CIDEr-D':>8} {'BLEU-4':>8} {'ROUGE-L':>8} {'steps/s':>8}")
    print(f"{f'best constant caption of {candidates}':44} {constant['CIDEr_D']:8.4f} {constant['BLEU_4']:8.4f} "
          f"{constant['ROUGE_L']:8.4f}    ({text!r})")
    label = f"decoder, beam {config['beam']}, step {best['step']}"
    print(f"{label:44} {best['val_CIDEr_D']:8.4f} "
          f"{best['val_BLEU_4']:8.4f} {best['val_ROUGE_L']:8.4f} {_rate(records):8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--retrieval", nargs="*", default=[], metavar="NAME=WORKDIR")
    parser.add_argument("--captioning", metavar="WORKDIR")
    parser.add_argument("--candidates", type=int, default=200, help="constant captions tried (default %(default)s)")
    args = parser.parse_args()
    print(f"CPU: {cpu_model_name()} ({', '.join(cpu_speed_flags())})")
    if args.retrieval:
        retrieval_rows(args.retrieval)
    if args.captioning:
        captioning_rows(args.captioning, args.candidates)


if __name__ == "__main__":
    main()
