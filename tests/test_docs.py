"""The docs' commands work when followed: every command in README.md's and docs/*.md's code blocks (and the
configs' docstrings, and prose quotes that pass options) that runs ``train.py``, ``python -m convert`` or
``convnext-audio`` names a subcommand, flags and ``--config.KEY``s that exist (read from the real parsers and
config files, not from a list kept here; tests/doc_commands.py), and each documented multi-process launch of
``train.py`` gets past its configuration (``train.py --check``, data swapped for the demo set, in a subprocess)."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

from doc_commands import (
    CONFIG_FILES,
    DATA_SPEC_KEYS,
    DOCS,
    LAUNCHERS,
    REPO,
    Command,
    commands_in,
    doc_problems,
    is_placeholder,
    load_config,
    train_arguments,
    usage_tokens,
)

from convnext_audio_jax.data import spec as spec_lib


def test_every_documented_command_names_real_subcommands_flags_and_config_keys():
    commands, problems = doc_problems(DOCS + CONFIG_FILES)
    assert not problems, f"{len(problems)} broken doc command(s):\n" + "\n".join(problems)
    programs = {command.program for command in commands}
    assert programs == {"train.py", "convert", "convnext-audio"}, programs  # the reader found each kind
    assert len(commands) > 40, len(commands)


def test_a_broken_doc_command_is_reported_with_its_file_and_line(tmp_path):
    doc = tmp_path / "broken.md"
    doc.write_text(
        "# Broken\n\n```bash\n"
        "convnext-audio tagg x.wav --checkpoint ckpt/\n"  # line 4
        "convnext-audio tag x.wav --checkpoints ckpt/ --format yaml\n"  # 5
        "XLA_FLAGS=--x .venv/bin/python train.py --config configs/demo.py --workdir w \\\n"  # 6
        "    --config.total_step=20 --config.data.train=nowhere\n"
        "srun python train.py --config configs/demo.py --work_dir w && python -m convert a.pth out --modle m\n"  # 8
        "```\n\n   ```\n   convnext-audio export --output f.onnx\n   ```\n")  # 12, in an indented block
    _, problems = doc_problems([doc])
    expected = [
        ("broken.md:4", "convnext-audio has no subcommand 'tagg' (closest: tag)"),
        ("broken.md:5", "`convnext-audio tag` has no option --checkpoints (closest: --checkpoint)"),
        ("broken.md:5", "`convnext-audio tag --format` takes ['csv', 'json', 'jsonl', 'table']; the doc gives 'yaml'"),
        ("broken.md:6", "--config.data.train: data SPEC 'nowhere': 'nowhere' is none of DIR@SPLIT"),
        ("broken.md:6", "configs/demo.py has no key 'total_step' for --config.total_step (closest: total_steps)"),
        ("broken.md:8", "train.py has no flag --work_dir (closest: workdir)"),
        ("broken.md:8", "`python -m convert` has no option --modle (closest: --model)"),
        ("broken.md:12", "`convnext-audio export` takes 1..1 positional arguments; the doc gives []"),
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, (where, message) in zip(problems, expected):
        assert problem.startswith(f"{where}: {message}"), (problem, where, message)


# --------------------------------------------------------------------- documented multi-process launches


def slurm_environment(sbatch: dict[str, str], process_id: int) -> dict[str, str]:
    """What srun sets for task ``process_id`` of the job an #SBATCH header describes."""
    nodes, per_node = int(sbatch.get("nodes", 1)), int(sbatch.get("ntasks-per-node", 1))
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": f"node[001-{nodes:03d}]", "SLURM_NTASKS": str(nodes * per_node),
            "SLURM_PROCID": str(process_id), "SLURM_LOCALID": str(process_id % per_node),
            "SLURM_NODEID": str(process_id // per_node), "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})"}


def expand(token: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda match: env.get(match.group(1), match.group(0)), token)


def check_command_line(command: Command, env: dict[str, str], workdir: pathlib.Path) -> list[str]:
    """The documented arguments for ``train.py --check`` here: the workdir moved to ``workdir``, the data SPECs
    (parsed by the test above) swapped for the demo set, a placeholder init_from dropped, $VARs expanded."""
    tokens = usage_tokens([expand(token, env) for token in command.args])
    config_file, overrides, _ = train_arguments(tokens)
    kept, remaining = [], iter(tokens)
    for token in remaining:
        name, equals, _ = token.lstrip("-").partition("=")
        swapped = name.removeprefix("config.") in DATA_SPEC_KEYS or (name == "config.init_from" and is_placeholder(token))
        if name == "workdir" or swapped:
            if not equals:
                next(remaining, None)
            if name == "workdir":
                kept.append(f"--workdir={workdir}")
        else:
            kept.append(token)
    validation = overrides.get("data.validation", load_config(config_file).data.validation)
    kept += ["--config.data.train=demo", "--config.data.eval=demo@eval"]
    if spec_lib.parse_holdout(validation) is None:
        kept.append("--config.data.validation=demo@validation")
    return kept


def test_documented_multi_process_launches_get_past_configuration(tmp_path):
    """Each documented launch of train.py on several processes (SLURM, Kubernetes, processes on one machine),
    with its environment (the #SBATCH header as srun sets it, the container's env), through ``--check``: the
    multi-process settings are resolved as the job would resolve them, without joining."""
    launches = [c for c in (c for path in DOCS for c in commands_in(path)) if c.program == "train.py" and (
        set(c.launcher) & set(LAUNCHERS) or c.launcher == ["sh", "-c"]
        or any(t.lstrip("-").split("=")[0] in ("coordinator", "num_processes", "process_id") for t in c.args))]
    assert {"srun", "sh"} <= {c.launcher[0] for c in launches if c.launcher}, [str(c) for c in launches]
    runs = []  # (command, environment, the job this process must find itself in)
    for command in launches:
        if "srun" in command.launcher:
            nodes, per_node = int(command.sbatch["nodes"]), int(command.sbatch["ntasks-per-node"])
            runs.append((command, slurm_environment(command.sbatch, 0),
                         f"process 0 of {nodes * per_node} (SlurmCluster, per_host)"))
            # docs/train.md: "the same script with --ntasks-per-node=8": one process per GPU, each pinned to its own
            per_gpu = {**command.sbatch, "ntasks-per-node": "8"}
            runs.append((command, slurm_environment(per_gpu, 3), f"process 3 of {nodes * 8} (SlurmCluster, per_device)"))
        elif command.launcher == ["sh", "-c"]:  # a Kubernetes indexed Job sets the pod's index
            runs.append((command, {**command.env, "JOB_COMPLETION_INDEX": "1"},
                         f"process 1 of {command.env['JAX_NUM_PROCESSES']} (flags/env, per_host)"))
        else:
            given = dict(re.findall(r"--(num_processes|process_id)[= ](\d+)", " ".join(command.args)))
            runs.append((command, dict(command.env),
                         f"process {given['process_id']} of {given['num_processes']} (flags/env, per_host)"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "OMPI_", "KUBERNETES_"))}
    base.update(JAX_PLATFORMS="cpu", CONVNEXT_AUDIO_JAX_KEEP_FREED_MEMORY="0")
    started = []
    for number, (command, env, job) in enumerate(runs):
        workdir = tmp_path / f"launch{number}" / "runs" / "workdir"
        workdir.parent.mkdir(parents=True)
        environment = {**base, **env}
        argv = [sys.executable, "train.py", *check_command_line(command, environment, workdir), "--check"]
        started.append((command, job, workdir, argv, subprocess.Popen(
            argv, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    failures = []
    for command, job, workdir, argv, process in started:
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        lines = stdout.strip().splitlines()
        if process.returncode != 0 or len(lines) != 1 or not lines[0].startswith("train.py: ok:") or job not in lines[0]:
            failures.append(f"{command}\n  ran: {shlex.join(argv[1:])}\n  exit {process.returncode}, expected "
                            f"{job!r}; stdout: {stdout.strip()}\n  stderr: {stderr.strip()[-1500:]}")
        if workdir.exists():
            failures.append(f"{command}: --check created {workdir}")
    assert not failures, "\n".join(failures)
