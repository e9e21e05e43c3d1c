"""runtime/flags.py: the model, data and multi-process flag groups, each defined once and taken by every command
that needs it (parsed by the real ``convnext-audio`` parser and by absl, as train.py does)."""

import pytest
from absl import flags as absl_flags

from convnext_audio_jax.cli import build_parser
from convnext_audio_jax.runtime import flags

JOB = {"coordinator": "10.0.0.1:1234", "num_processes": 4, "process_id": 3, "local_device_ids": "0,1",
       "layout": "per_host"}
COMMANDS = {
    "evaluate": ["evaluate", "--data", "demo@eval"],
    "predict": ["predict", "--data", "demo@validation", "--output", "teacher.h5"],
    "embed": ["embed", "a.wav", "--output", "e.npz"],
}


def job_argv(dashes: bool) -> list[str]:
    argv = []
    for name, value in JOB.items():
        argv += [f"--{name.replace('_', '-') if dashes else name}", str(value)]
    return argv


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("dashes", [False, True])
def test_every_multi_process_command_joins_the_job_its_flags_describe(command, dashes, monkeypatch):
    """evaluate, predict and embed take the same multi-process flags (train.py's spellings, and with dashes) and
    hand them to the one join (distributed.initialize) in train.py's order."""
    joined = []
    monkeypatch.setattr(flags.distributed, "initialize", lambda *values: joined.append(values))
    args = build_parser().parse_args([*COMMANDS[command], "--model", "m/", *job_argv(dashes)])
    flags.join_job(args)
    assert joined == [tuple(JOB.values())]


def test_train_py_flags_come_from_the_same_table():
    """train.py defines its absl flags with define_absl_job_flags: same names, same values as the commands get."""
    values = absl_flags.FlagValues()

    class Definer:  # absl.flags' DEFINE_* into a private FlagValues, so the test leaves absl.flags.FLAGS alone
        DEFINE_string = staticmethod(lambda *a, **k: absl_flags.DEFINE_string(*a, **k, flag_values=values))
        DEFINE_integer = staticmethod(lambda *a, **k: absl_flags.DEFINE_integer(*a, **k, flag_values=values))

    holders = flags.define_absl_job_flags(Definer)
    values(["train.py", *[f"--{name}={value}" for name, value in JOB.items()]])
    assert list(holders) == list(flags.JOB_FLAGS) == list(JOB)
    assert [holder.value for holder in holders.values()] == list(JOB.values())
    assert all(values[name].help == help_text for name, (_, help_text) in flags.JOB_FLAGS.items())


@pytest.mark.parametrize("command", ["evaluate", "predict", "tag", "embed"])
@pytest.mark.parametrize("spelling", ["--model", "--checkpoint"])
def test_model_flag_and_its_older_spelling(command, spelling):
    argv = {"tag": ["tag", "a.wav"], **COMMANDS}[command]
    args = build_parser().parse_args([*argv, spelling, "m/"])
    assert args.model == (["m/"] if command == "predict" else "m/") and args.model_flag == spelling
    if command != "predict":
        help_text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
        assert "--model MODEL, --checkpoint MODEL" in help_text.replace("\n", " ").replace("  ", " ")
