"""Issue 15 item 13: the scripts in launch/ on a cluster, run here with stand-in ``nvidia-smi``, ``torchrun``,
``deepspeed``, ``srun`` and ``scontrol`` executables on a PATH that holds nothing else of the system's.

- torchrun.sh / single_node.sh count GPUs without nvidia-smi (and say so), never exit 127 in silence;
- torchrun.sh makes torchrun pass SIGUSR1 on to its processes (torch's default would kill torchrun alone), and
  refuses several nodes without MASTER_ADDR or NODE_RANK;
- single_node.sh runs on the GPUs CUDA_VISIBLE_DEVICES names (DeepSpeed's own launcher, which drops that variable
  once given --num_gpus, checked with a faked device count), and refuses what it cannot place there;
- multi_node.sh forwards the virtual environment and the NCCL/HF/... settings through a temporary DeepSpeed
  environment file, written outside the repository, in a form DeepSpeed's own quoting keeps intact;
- slurm.sbatch logs into a folder that exists, asks for SIGUSR1 before the time limit, starts one srun task per
  process (2 "nodes" x 1 give the losses of 1 node x 2), and requeues a job that stopped on SIGUSR1 with a
  checkpoint; the requeued job resumes and the run loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cclm.runtime.env import free_port

from ..conftest import build_mla_world, build_test_world

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
BASH = shutil.which("bash")
# The system tools the scripts use; they are linked one by one into the test's PATH, so that no nvidia-smi (nor
# any other program of the machine) is found by accident.
TOOLS = ("awk", "cat", "cut", "dirname", "find", "grep", "head", "mktemp", "paste", "rm", "sleep", "sort")
VENV_BIN = str(Path(sys.executable).parent)  # python, with torch, as a user's activated environment has it


def stand_in(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}")
    path.chmod(0o755)
    return path


def make_machine(tmp: Path) -> SimpleNamespace:
    """A PATH of stand-ins (``fake``, filled by each test), the system tools, then the virtual environment; an
    environment without launcher, SLURM or GPU settings of the machine that runs the tests."""
    fake, tools, home = tmp / "fake-bin", tmp / "tools", tmp / "home"
    for folder in (fake, tools, home):
        folder.mkdir()
    for tool in (BASH, *TOOLS):
        (tools / Path(tool).name).symlink_to(shutil.which(tool))
    record = tmp / "record"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "CUDA_", "PET_", "TORCH_ELASTIC", "NCCL_", "HF_", "CCLM_", "DS_"))
        and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC", "NUM_GPUS")
        and key not in ("NNODES", "NODE_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    }
    env.update(PATH=f"{fake}:{tools}:{VENV_BIN}", HOME=str(home), RECORD=str(record))
    return SimpleNamespace(fake=fake, env=env, record=record, tmp=tmp)


@pytest.fixture
def machine(tmp_path) -> SimpleNamespace:
    return make_machine(tmp_path)


def run_script(machine, script: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(LAUNCH / script), *args],
        cwd=REPO,
        env={**machine.env, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


RECORD_ARGS = 'printf "%s\\n" "$@" > "$RECORD"\n'


def recorded(machine) -> list[str]:
    return machine.record.read_text().splitlines()


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def torch_gpus() -> int:
    return torch.cuda.device_count()  # what the launch scripts' python sees here (0 on the CPU test machines)


# --------------------------------------------------------------------------------- counting GPUs, torchrun.sh
def test_torchrun_without_nproc_or_nvidia_smi_counts_with_torch(machine):
    stand_in(machine.fake, "torchrun", RECORD_ARGS)
    result = run_script(machine, "torchrun.sh", "configs/pretrain/demo.yaml", "train.max_steps=5")
    assert result.returncode == 0, result.stderr
    args = recorded(machine)
    assert option(args, "--nproc_per_node") == str(max(torch_gpus(), 1))
    assert args[-4:] == ["-m", "cclm.train.cli", "configs/pretrain/demo.yaml", "train.max_steps=5"]
    if torch_gpus() == 0:
        assert result.stderr == (
            "torchrun.sh: no GPU found (no nvidia-smi on PATH; torch.cuda.device_count() of python): starting 1 "
            "CPU process; set NPROC=N for more\n"
        )


def test_gpus_listed_by_nvidia_smi_without_its_mig_lines(machine):
    stand_in(
        machine.fake,
        "nvidia-smi",
        'echo "GPU 0: NVIDIA H100 (UUID: GPU-0)"\n'
        'echo "  MIG 3g.40gb     Device  0: (UUID: MIG-a)"\n'
        'echo "GPU 1: NVIDIA H100 (UUID: GPU-1)"\n',
    )
    stand_in(machine.fake, "torchrun", RECORD_ARGS)
    stand_in(machine.fake, "deepspeed", RECORD_ARGS)
    assert run_script(machine, "torchrun.sh", "c.yaml").returncode == 0
    assert option(recorded(machine), "--nproc_per_node") == "2"
    assert run_script(machine, "single_node.sh", "c.yaml").returncode == 0
    assert option(recorded(machine), "--num_gpus") == "2"


def test_cuda_visible_devices_and_explicit_counts_win(machine):
    stand_in(machine.fake, "nvidia-smi", "echo 'nvidia-smi must not be asked' >&2; exit 9\n")
    stand_in(machine.fake, "torchrun", RECORD_ARGS)
    stand_in(machine.fake, "deepspeed", RECORD_ARGS)
    assert run_script(machine, "torchrun.sh", "c.yaml", CUDA_VISIBLE_DEVICES="0,3,5").returncode == 0
    assert option(recorded(machine), "--nproc_per_node") == "3"
    assert run_script(machine, "torchrun.sh", "c.yaml", NPROC="4").returncode == 0
    assert option(recorded(machine), "--nproc_per_node") == "4"
    assert run_script(machine, "single_node.sh", "c.yaml", NUM_GPUS="2").returncode == 0
    assert option(recorded(machine), "--num_gpus") == "2"


def test_single_node_without_gpus_says_what_to_do(machine):
    stand_in(machine.fake, "deepspeed", RECORD_ARGS)
    result = run_script(machine, "single_node.sh", "c.yaml", CUDA_VISIBLE_DEVICES="")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "single_node.sh: no GPU found (CUDA_VISIBLE_DEVICES=''); set NUM_GPUS=N, or use launch/torchrun.sh for "
        "CPU processes\n"
    )
    assert not machine.record.exists()
    if torch_gpus() == 0:  # no nvidia-smi on this PATH: torch is asked, and says 0
        result = run_script(machine, "single_node.sh", "c.yaml")
        assert result.returncode == 1
        assert "no GPU found (no nvidia-smi on PATH; torch.cuda.device_count() of python)" in result.stderr


def test_torchrun_passes_sigusr1_to_its_processes(machine):
    """torchrun.sh's settings given to the real torchrun agent: SIGUSR1 sent to torchrun reaches both processes
    (torch's default set of handled signals would let SIGUSR1 kill the agent and orphan them)."""
    worker = machine.tmp / "worker.py"
    worker.write_text(
        "import os, pathlib, signal, sys, time\n"
        "folder = pathlib.Path(sys.argv[1])\n"
        "def stop(signum, frame):\n"
        "    (folder / f'got-{os.environ[\"RANK\"]}').write_text(signal.Signals(signum).name)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGUSR1, stop)\n"
        "(folder / f'ready-{os.environ[\"RANK\"]}').write_text(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    # the real torchrun with the script's options, running the worker instead of cclm
    stand_in(
        machine.fake,
        "torchrun",
        'args=()\nfor a in "$@"; do [[ "$a" == -m ]] && break; args+=("$a"); done\n'
        f'exec {sys.executable} -m torch.distributed.run "${{args[@]}}" {worker} {machine.tmp}\n',
    )
    proc = subprocess.Popen(
        [BASH, str(LAUNCH / "torchrun.sh"), "c.yaml"],
        cwd=REPO,
        env={**machine.env, "NPROC": "2"},  # torchrun's standalone rendezvous, as without MASTER_PORT
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not all((machine.tmp / f"ready-{rank}").exists() for rank in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, "torchrun did not start its processes"
            time.sleep(0.1)
        # bash exec'd the stand-in, which exec'd torchrun: this pid is torchrun's agent
        os.kill(proc.pid, signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [(machine.tmp / f"got-{rank}").read_text() for rank in (0, 1)] == ["SIGUSR1", "SIGUSR1"], err
    for rank in (0, 1):  # and nothing is left running
        pid = int((machine.tmp / f"ready-{rank}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ----------------------------------------------------------------- a tester's faults: rendezvous address and port
def test_torchrun_on_one_node_rendezvous_on_a_free_port_unless_master_port_is_set(machine):
    """Two jobs on one node both took port 29500; the second died with EADDRINUSE. Without MASTER_PORT torchrun's
    standalone rendezvous binds a free port (tests/faults/test_port_race.py runs two such jobs at once)."""
    stand_in(machine.fake, "torchrun", RECORD_ARGS)
    assert run_script(machine, "torchrun.sh", "c.yaml", NPROC="2").returncode == 0
    args = recorded(machine)
    assert "--standalone" in args and "--master_port" not in args and "29500" not in args
    assert run_script(machine, "torchrun.sh", "c.yaml", NPROC="2", MASTER_PORT="12345").returncode == 0
    args = recorded(machine)
    assert "--standalone" not in args and option(args, "--master_port") == "12345"


def test_single_node_takes_a_free_port_unless_master_port_is_set(machine):
    """DeepSpeed's launcher defaults to 29500, which another job on the node may hold (held here, when it is free)."""
    import socket

    stand_in(machine.fake, "deepspeed", RECORD_ARGS)
    with socket.socket() as other_job:
        try:
            other_job.bind(("", 29500))
            other_job.listen()
        except OSError:
            pass  # another process holds it already
        assert run_script(machine, "single_node.sh", "c.yaml", NUM_GPUS="2").returncode == 0
        port = int(option(recorded(machine), "--master_port"))
        assert port != 29500
        with socket.socket() as probe:
            probe.bind(("", port))  # free
    assert run_script(machine, "single_node.sh", "c.yaml", NUM_GPUS="2", MASTER_PORT="12345").returncode == 0
    assert option(recorded(machine), "--master_port") == "12345"


def test_torchrun_reads_the_signal_settings_torchrun_sh_exports(monkeypatch):
    from torch.distributed.run import get_args_parser

    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    script = (LAUNCH / "torchrun.sh").read_text()
    assert "PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}" in script
    assert get_args_parser().parse_args(["worker.py"]).signals_to_handle.split(",")[-1] == "SIGUSR1"


# ----------------------------------------------------------------------------------------------- multi_node.sh
def test_multi_node_forwards_the_environment_through_a_temporary_file(machine):
    stand_in(
        machine.fake,
        "deepspeed",
        RECORD_ARGS + 'cat "$DS_ENV_FILE" > "$RECORD.env"\necho "$DS_ENV_FILE" > "$RECORD.path"\n',
    )
    hostfile = machine.tmp / "hostfile"
    hostfile.write_text("# nodes\nnode01 slots=8\nnode02 slots=8\n")
    (machine.tmp / "home" / ".deepspeed_env").write_text("UCX_TLS=rc\n")
    venv = str(Path(VENV_BIN).parent)
    settings = {
        "VIRTUAL_ENV": venv,
        "NCCL_SOCKET_IFNAME": "ib0",
        "NCCL_IB_HCA": "mlx5_0,mlx5_1",
        "HF_HOME": "/shared/hf cache",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CCLM_DEBUG": "1",
        "OMP_NUM_THREADS": "4",
        "NCCL_BAD": 'has "quotes" and $HOME',
        "SECRET_TOKEN": "not for other nodes",
    }
    result = run_script(
        machine,
        "multi_node.sh",
        "configs/pretrain/cclm_4m.yaml",
        "train.max_steps=10",
        HOSTFILE=str(hostfile),
        **settings,
    )
    assert result.returncode == 0, result.stderr
    args = recorded(machine)
    assert args[:6] == ["--hostfile", str(hostfile), "--master_addr", "node01", "--master_port", "29500"]
    assert args[6:] == ["--module", "cclm.train.cli", "configs/pretrain/cclm_4m.yaml", "train.max_steps=10"]

    lines = Path(f"{machine.record}.env").read_text().splitlines()
    forwarded = dict(line.split("=", 1) for line in lines)
    assert lines[0] == "UCX_TLS=rc"  # the user's own ~/.deepspeed_env comes first
    for key in (
        "VIRTUAL_ENV",
        "NCCL_SOCKET_IFNAME",
        "NCCL_IB_HCA",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
    ):
        assert forwarded[key] == settings[key]
    assert forwarded["CCLM_DEBUG"] == "1" and forwarded["OMP_NUM_THREADS"] == "4"
    assert forwarded["PATH"] == machine.env["PATH"]
    assert forwarded["PYTHONPATH"].split(":")[0] == str(REPO)
    assert "SECRET_TOKEN" not in forwarded and "NCCL_BAD" not in forwarded
    assert (
        "multi_node.sh: not forwarding NCCL_BAD: its value holds a quote, $, `, \\ or a newline"
        in result.stderr
    )

    # written outside the repository, removed afterwards, and nothing left in the checkout
    env_file = Path(Path(f"{machine.record}.path").read_text().strip())
    assert not env_file.exists() and REPO not in env_file.parents
    assert not (REPO / ".deepspeed_env").exists()
    _check_deepspeed_reads(env_file, lines)


def _check_deepspeed_reads(env_file: Path, lines: list[str]) -> None:
    """DeepSpeed's runner finds an absolute DS_ENV_FILE, and the values survive the quoting with which it puts
    them on every node's command line (``export KEY=VALUE; ...`` run by a shell there)."""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; from deepspeed.launcher import runner as r\n"
            "print(sorted({os.path.join(p, r.DEEPSPEED_ENVIRONMENT_NAME) for p in r.DEEPSPEED_ENVIRONMENT_PATHS}))",
        ],
        env={**os.environ, "DS_ENV_FILE": str(env_file)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.stdout.splitlines()[-1] == repr([str(env_file)]), probe.stderr[-2000:]
    from deepspeed.launcher.multinode_runner import MultiNodeRunner

    runner = SimpleNamespace(exports={})
    for line in lines:
        MultiNodeRunner.add_export(runner, *line.split("=", 1))
    exports = "".join(f"export {key}={value}; " for key, value in runner.exports.items())
    shell = subprocess.run(
        [BASH, "-c", exports + f"{shutil.which('env')} -0"],
        capture_output=True,
        text=True,
        env={},
        timeout=30,
    )
    remote = dict(item.split("=", 1) for item in shell.stdout.split("\0") if item)
    for line in lines:
        key, value = line.split("=", 1)
        assert remote[key] == value, key


def test_multi_node_without_hostfile_says_so(machine):
    result = run_script(machine, "multi_node.sh", "c.yaml", HOSTFILE=str(machine.tmp / "nope"))
    assert (result.returncode, result.stderr) == (
        1,
        f"multi_node.sh: hostfile {machine.tmp / 'nope'} not found (see launch/hostfile.example)\n",
    )


# ---------------------------------------------------------------------------------------------- slurm.sbatch
SBATCH = LAUNCH / "slurm.sbatch"
JOB_ID = 4242


def sbatch_options() -> dict[str, str]:
    """The #SBATCH options, read as sbatch reads them: up to the first line that is not a comment."""
    options = {}
    for line in SBATCH.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            name, _, value = line.removeprefix("#SBATCH ").partition("=")
            options[name] = value
    return options


def test_sbatch_header_logs_where_slurm_can_write_and_warns_before_the_limit():
    options = sbatch_options()
    assert options["--output"] == "%x-%j.out"  # the submit folder: exists before the job starts
    assert options["--open-mode"] == "append"  # a requeued job continues the same log
    assert "--requeue" in options
    # SIGUSR1 to every process of the job's steps (not to the batch shell), at least 5 minutes before the limit
    signal_name, _, seconds = options["--signal"].partition("@")
    assert signal_name == "USR1" and int(seconds) >= 300
    assert options["--ntasks-per-node"] == options["--gpus-per-node"]  # one task per GPU
    # a mkdir in the job would run after SLURM opened the log
    commands = [line for line in SBATCH.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in commands if "mkdir" in line]


def slurm_machine(machine, nodes: int, tasks_per_node: int) -> dict[str, str]:
    """Stand-in srun (every task of every "node" on this machine, with SLURM's task and step variables; the tasks'
    pids go to ``$RECORD.pids``) and scontrol (node names; a requeue is recorded), and a job's environment."""
    stand_in(
        machine.fake,
        "srun",
        'echo "$*" >> "$RECORD.srun"\n'
        "per_node=1\n"
        'while [[ "$1" == --* ]]; do [[ "$1" == --ntasks-per-node=* ]] && per_node=${1#*=}; shift; done\n'
        "pids=()\n"
        "export SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS=$((SLURM_NNODES * per_node))\n"
        "for ((node = 0; node < SLURM_NNODES; node++)); do\n"
        "  for ((local = 0; local < per_node; local++)); do\n"
        '    SLURM_NODEID=$node SLURM_LOCALID=$local SLURM_PROCID=$((node * per_node + local)) "$@" &\n'
        '    pids+=($!); echo $! >> "$RECORD.pids"\n'
        "  done\n"
        "done\n"
        'status=0; for pid in "${pids[@]}"; do wait "$pid" || status=$?; done; exit $status\n',
    )
    stand_in(
        machine.fake,
        "scontrol",
        'case "$1" in\n'
        "  show) for ((i = 1; i <= SLURM_NNODES; i++)); do echo localhost; done ;;\n"
        '  *) echo "$*" >> "$RECORD.scontrol" ;;\n'
        "esac\n",
    )
    return {
        **machine.env,
        "SLURM_JOB_ID": str(JOB_ID),
        "SLURM_JOB_NAME": "cclm-pretrain",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_CPUS_PER_TASK": "1",
        "CCLM_MASTER_PORT": str(free_port()),  # not the job id's port, which every test's job would share
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def test_sbatch_refuses_more_tasks_than_gpus(machine):
    env = {**slurm_machine(machine, 2, 8), "SLURM_GPUS_ON_NODE": "4"}
    result = subprocess.run([BASH, str(SBATCH), "c.yaml"], cwd=REPO, env=env, capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (
        2,
        "slurm.sbatch: 8 tasks per node for 4 GPUs per node: one training process per GPU, submit with "
        "--ntasks-per-node=4\n",
    )


def test_sbatch_outside_a_job_says_so(machine):
    result = subprocess.run(
        [BASH, str(SBATCH), "c.yaml"], cwd=REPO, env=machine.env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "SLURM_NNODES: not inside a SLURM job: submit with sbatch" in result.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_test_world(
        tmp_path_factory.mktemp("world") / "w",
        num_images=48,
        image_size=32,
        heldout_images=4,
        xvnli_images=4,
        seed=5,
    )


MAX_STEPS = 16


def pretrain_args(world: Path, output_dir: Path) -> list[str]:
    def shards(folder: Path) -> str:
        return f"{folder}/shard-{{000000..{len(list(folder.glob('shard-*.tar'))) - 1:06d}}}.tar"

    overrides = {
        "model.text.tokenizer": world / "tokenizer",
        "data.image_caption.shards": shards(world / "image_caption"),
        "data.parallel_text.shards": shards(world / "parallel"),
        "data.image_caption.batch_size": 8,
        "data.parallel_text.batch_size": 8,
        "data.num_workers": 1,  # as in the demo config: the step's processes include DataLoader workers
        "output_dir": output_dir,
        "train.max_steps": MAX_STEPS,
        "train.log_every": 1,
        "train.save_every": MAX_STEPS,
        "train.scheduler.warmup_steps": 2,
        "train.optimizer.lr": 2e-3,
    }
    return ["configs/pretrain/demo.yaml", *(f"{key}={value}" for key, value in overrides.items())]


def metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(records: list[dict]) -> dict[int, dict[str, float]]:
    """Per step, the losses (every objective of each view) -- what must not depend on how processes were laid
    out over nodes, nor on an interruption."""
    objectives = ("loss", "itc", "itm", "mlm", "ttc", "ttm")
    return {r["step"]: {k: v for k, v in r.items() if k.split("/")[-1] in objectives} for r in records}


def sbatch(machine, env: dict, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [BASH, str(SBATCH), *args],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the job's process group: a failed test kills all of it
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return log.read_text()


@pytest.fixture(scope="module")
def two_node_run(world, tmp_path_factory) -> dict:
    """An uninterrupted job on 2 "nodes" x 1 process: the reference of the tests below."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    machine = make_machine(tmp)
    out = tmp / "out"
    log = tmp / "job.log"
    output = finish(sbatch(machine, slurm_machine(machine, 2, 1), pretrain_args(world, out), log), log)
    srun_calls = Path(f"{machine.record}.srun").read_text().splitlines()
    return {"out": out, "log": output, "srun": srun_calls, "records": metrics(out), "machine": machine}


def test_sbatch_two_nodes_give_the_losses_of_one_node(two_node_run, world, machine):
    assert [r["step"] for r in two_node_run["records"]] == list(range(1, MAX_STEPS + 1)), two_node_run["log"][
        -3000:
    ]
    assert two_node_run["srun"] == [
        "--kill-on-bad-exit=1 --ntasks=2 --ntasks-per-node=1 bash -c export RANK=$SLURM_PROCID "
        f'LOCAL_RANK=$SLURM_LOCALID; exec "$@" cclm-task python -m cclm.train.cli '
        f"{' '.join(pretrain_args(world, two_node_run['out']))} resume=auto"
    ]
    assert re.search(
        r"slurm.sbatch: job 4242 \(restart 0\): 2 node\(s\) x 1 process\(es\), rendezvous localhost:\d+",
        two_node_run["log"],
    )
    assert not Path(f"{two_node_run['machine'].record}.scontrol").exists()  # finished: no requeue

    out = machine.tmp / "one-node"
    log = machine.tmp / "job.log"
    output = finish(sbatch(machine, slurm_machine(machine, 1, 2), pretrain_args(world, out), log), log)
    one_node = metrics(out)
    assert [r["step"] for r in one_node] == list(range(1, MAX_STEPS + 1)), output[-3000:]
    reference = losses(two_node_run["records"])
    assert all(reference[step] for step in reference) and "image/itm" in reference[2]
    assert losses(one_node) == reference


def step_processes(task_pids: list[int]) -> list[int]:
    """The tasks and every process they started (DataLoader workers): what SLURM signals in a job step, the
    processes of its cgroup."""
    children = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (name) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children[parent].append(int(stat.parent.name))
    found, todo = [], list(task_pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children[pid]
    return found


def signalled_job(machine, env, args, log: Path, watched: Path, records: int) -> tuple[subprocess.Popen, str]:
    """Run a job and, once ``watched/metrics.jsonl`` holds ``records`` records, send SIGUSR1 as SLURM does: to
    every process of the job step, the tasks and their DataLoader workers. Returns the finished job and its log."""
    proc = sbatch(machine, env, args, log)
    try:
        deadline = time.monotonic() + 240
        while len(metrics(watched)) < records:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the job logged no {records} records in {watched} in time"
            time.sleep(0.05)
        tasks = [int(pid) for pid in Path(f"{machine.record}.pids").read_text().split()]
        for pid in step_processes(tasks):
            os.kill(pid, signal.SIGUSR1)
    finally:
        output = finish(proc, log)
    return proc, output


def test_sbatch_requeues_a_job_stopped_by_sigusr1_and_the_requeued_job_loses_nothing(
    two_node_run, world, machine
):
    """SLURM's warning before the time limit (--signal=USR1@...) reaches every training process: they save a
    checkpoint, rank 0 writes interrupted.json, all exit 0, and the script requeues the job. The requeued job
    (same command) resumes from that checkpoint and ends with the uninterrupted run's losses at every step."""
    env = slurm_machine(machine, 2, 1)
    out = machine.tmp / "requeued"
    log = machine.tmp / "job.log"
    proc, output = signalled_job(machine, env, pretrain_args(world, out), log, out, records=2)
    assert proc.returncode == 0, output[-3000:]
    marker = json.loads((out / "interrupted.json").read_text())
    assert set(marker) == {"step", "signal", "checkpoint"} and marker["signal"] == "SIGUSR1"
    assert 2 <= marker["step"] < MAX_STEPS, "the job was not stopped before its end"
    assert (Path(marker["checkpoint"]) / "complete.json").exists()
    assert Path(f"{machine.record}.scontrol").read_text() == f"requeue {JOB_ID}\n"
    assert (
        "slurm.sbatch: stopped by a signal with a checkpoint" in output
        and f"requeueing job {JOB_ID}" in output
    )

    Path(f"{machine.record}.pids").unlink()
    env.update(SLURM_RESTART_COUNT="1", CCLM_MASTER_PORT=str(free_port()))
    output = finish(sbatch(machine, env, pretrain_args(world, out), log), log)
    assert "slurm.sbatch: job 4242 (restart 1)" in output, output[-3000:]
    assert not (out / "interrupted.json").exists()
    assert Path(f"{machine.record}.scontrol").read_text() == f"requeue {JOB_ID}\n"  # not requeued again
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1)), output[-3000:]
    assert losses(records) == losses(two_node_run["records"])


@pytest.fixture(scope="module")
def recipe_world(tmp_path_factory) -> Path:
    """English and Japanese captions, ja-en parallel text and a tokenizer that splits CJK: MLA's inputs."""
    world = tmp_path_factory.mktemp("recipe_world") / "w"
    return build_mla_world(world, 64, seed=3, heldout_images=8, heldout_langs=("en", "ja"), xvnli_images=4)


def mla_args(world: Path, output_dir: Path) -> list[str]:
    overrides = {
        "world": world,
        "output_dir": output_dir,
        "languages": "[ja]",
        "clip.pretrained": "null",
        "nlt.steps": 4,
        "le.steps": 200,  # long enough to be signalled in
        "data.parallel_text.batch_size": 8,
        "data.image_caption.batch_size": 8,
        "train.log_every": 1,
        "train.save_every": 1000,  # only the stage ends and the signal save
        "train.scheduler.warmup_steps": 0,
    }
    # --threads among the overrides, as `cclm recipe` takes it: the script must not read it as a config key
    settings = [f"{k}={v}" for k, v in overrides.items()]
    return ["recipe", "mla", "configs/recipes/mla_demo.yaml", *settings[:3], "--threads", "1", *settings[3:]]


def test_sbatch_requeues_a_recipe_stopped_in_a_stage_and_the_requeued_job_ends_as_the_uninterrupted_one(
    recipe_world, machine
):
    """`sbatch launch/slurm.sbatch recipe mla CONFIG ... --threads 1 ...`: srun runs `cclm recipe`; SIGUSR1 in the
    second stage leaves its marker in `<output_dir>/le/` (output_dir a symbolic link), which the script finds and
    requeues; the requeued job (the same
    command, resume=auto added) skips the finished stage, continues the stopped one and writes the uninterrupted
    job's weights and losses."""
    from safetensors.torch import load_file

    env = slurm_machine(machine, 1, 1)
    log = machine.tmp / "job.log"
    whole = machine.tmp / "whole"
    output = finish(sbatch(machine, env, mla_args(recipe_world, whole), log), log)
    assert (whole / "results.json").exists(), output[-3000:]
    (srun,) = Path(f"{machine.record}.srun").read_text().splitlines()
    assert "cclm-task python -m cclm.cli recipe mla configs/recipes/mla_demo.yaml" in srun
    assert " --threads 1 " in srun  # passed on to cclm recipe, left out of the config the script reads
    assert srun.endswith(" resume=auto")

    # output_dir a symbolic link to the folder that holds the run (scratch space): the marker is still found
    out = machine.tmp / "requeued"
    (machine.tmp / "scratch").mkdir()
    out.symlink_to(machine.tmp / "scratch")
    Path(f"{machine.record}.pids").unlink()
    env["CCLM_MASTER_PORT"] = str(free_port())
    proc, output = signalled_job(machine, env, mla_args(recipe_world, out), log, out / "le", records=3)
    assert proc.returncode == 0, output[-3000:]
    marker = json.loads((out / "le" / "interrupted.json").read_text())
    assert 3 <= marker["step"] < 200, "the job was not stopped inside LE"
    assert Path(f"{machine.record}.scontrol").read_text() == f"requeue {JOB_ID}\n"
    assert not (out / "results.json").exists()

    Path(f"{machine.record}.pids").unlink()
    env.update(SLURM_RESTART_COUNT="1", CCLM_MASTER_PORT=str(free_port()))
    output = finish(sbatch(machine, env, mla_args(recipe_world, out), log), log)
    assert "slurm.sbatch: job 4242 (restart 1)" in output and (out / "results.json").exists(), output[-3000:]
    assert not (out / "le" / "interrupted.json").exists()
    assert Path(f"{machine.record}.scontrol").read_text() == f"requeue {JOB_ID}\n"  # not requeued again
    for stage in ("nlt", "le"):
        assert losses(metrics(out / stage)) == losses(metrics(whole / stage)), stage
    a, b = load_file(out / "acquired.safetensors"), load_file(whole / "acquired.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sbatch_names_an_unknown_recipe(machine):
    result = subprocess.run(
        [BASH, str(SBATCH), "recipe", "nope", "configs/recipes/mla_demo.yaml"],
        cwd=REPO,
        env=slurm_machine(machine, 1, 1),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert (
        "slurm.sbatch: unknown recipe 'nope': one of ['cvil', 'cvil_vqa', 'english-clip', 'mla']"
        in result.stderr
    )


def test_sbatch_runs_a_finetuning_job(machine, tiny_model_dir):
    """`sbatch launch/slurm.sbatch finetune CONFIG ...`: srun runs `cclm finetune` with resume=auto; the script
    reads output_dir from the fine-tuning config; a finished job is not requeued."""
    pytest.importorskip("easy_vqa")
    out = machine.tmp / "easy"
    args = ["finetune", "configs/finetune/easy_vqa.yaml", f"pretrained={tiny_model_dir}", f"output_dir={out}"]
    args += ["data.max_examples=8", "train.max_steps=2", "train.batch_size=4", "train.device=cpu"]
    log = machine.tmp / "job.log"
    output = finish(sbatch(machine, slurm_machine(machine, 1, 1), args, log), log)
    assert f"output_dir {out}" in output, output[-3000:]
    (srun,) = Path(f"{machine.record}.srun").read_text().splitlines()
    assert "cclm-task python -m cclm.cli finetune configs/finetune/easy_vqa.yaml" in srun
    assert srun.endswith(" resume=auto")
    assert (out / "results" / "easy_vqa" / "zero_shot.json").exists(), output[-3000:]
    assert not Path(f"{machine.record}.scontrol").exists()


@pytest.mark.parametrize("restart", ["0", "1"])
def test_a_requeued_job_continues_its_own_run_not_the_checkpoint_it_branched_from(machine, restart):
    """A job submitted with resume=<another run's checkpoint> starts a branch; requeued, it passed that checkpoint
    again, which resuming now refuses (the output folder holds the branch's run): the requeued job continues its
    own run with resume=auto."""
    env = slurm_machine(machine, 1, 1)
    stand_in(machine.fake, "srun", 'echo "$*" >> "$RECORD.srun"\n')  # records the command, trains nothing
    env["SLURM_RESTART_COUNT"] = restart
    branch = "resume=runs/base/checkpoints/step_00000100"
    args = ["configs/pretrain/demo.yaml", f"output_dir={machine.tmp / 'branch'}", branch]
    result = subprocess.run([BASH, str(SBATCH), *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (srun,) = Path(f"{machine.record}.srun").read_text().splitlines()
    assert srun.endswith(branch if restart == "0" else "resume=auto") and srun.count("resume=") == 1
    assert ("slurm.sbatch: requeued: resume=auto" in result.stdout) == (restart == "1")


def recording_sbatch(machine, env: dict, args: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    """slurm.sbatch under an srun that records its command line and the port it passes on, and trains nothing."""
    stand_in(machine.fake, "srun", 'echo "$*" >> "$RECORD.srun"\necho "$MASTER_PORT" > "$RECORD.port"\n')
    result = subprocess.run([BASH, str(SBATCH), *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (srun,) = Path(f"{machine.record}.srun").read_text().splitlines()
    return result, srun


@pytest.mark.parametrize("in_config", [False, True], ids=["given", "in-config"])
@pytest.mark.parametrize("restart", ["0", "1"])
def test_sbatch_overwrite_starts_the_first_job_anew_and_a_requeued_job_continues(machine, restart, in_config):
    """The script added resume=auto to every job, which made overwrite=true do nothing: the job continued the old
    run. The first job now runs with overwrite=true and without resume=auto (the old run is moved aside); a
    requeued one continues the run the first job started (resume=auto, overwrite=false)."""
    env = {**slurm_machine(machine, 1, 1), "SLURM_RESTART_COUNT": restart}
    out = machine.tmp / "run"
    if in_config:
        config = machine.tmp / "overwrite.yaml"
        config.write_text("defaults:\n  model: tiny\noverwrite: true\nresume: auto\n")  # as the paper configs
        args = [str(config), f"output_dir={out}"]
    else:
        args = ["configs/pretrain/demo.yaml", f"output_dir={out}", "overwrite=true"]
    result, srun = recording_sbatch(machine, env, args)
    settings = srun.split(" cclm-task python -m cclm.train.cli ")[1].split()
    if restart == "0":
        assert settings == [*args, "resume=null"]  # a config's resume: auto would continue the old run
        assert result.stdout.startswith(
            f"slurm.sbatch: overwrite=true: this job starts anew (a run in {out} is moved aside); a requeued job "
            "continues it with resume=auto\n"
        )
    else:
        assert settings == [*args[:2], "resume=auto", "overwrite=false"]
        assert result.stdout.startswith(
            "slurm.sbatch: requeued: resume=auto (the run's own newest checkpoint), not the overwrite=true of the "
            "submission\n"
        )


def test_a_requeued_branch_with_overwrite_drops_both(machine):
    env = {**slurm_machine(machine, 1, 1), "SLURM_RESTART_COUNT": "2"}
    args = ["configs/pretrain/demo.yaml", "resume=runs/base/checkpoints/step_00000100", "overwrite=true"]
    result, srun = recording_sbatch(machine, env, args)
    assert srun.endswith(" configs/pretrain/demo.yaml resume=auto overwrite=false"), srun
    assert "not the resume= and overwrite=true of the submission" in result.stdout


def test_sbatch_takes_its_port_from_the_job_not_from_the_submitting_shell(machine):
    """sbatch passes the submitting shell's environment on: an exported MASTER_PORT gave every job one port."""
    env = {**slurm_machine(machine, 1, 1), "MASTER_PORT": "11111"}
    del env["CCLM_MASTER_PORT"]
    result, _ = recording_sbatch(machine, env, ["configs/pretrain/demo.yaml"])
    port = 20000 + JOB_ID % 20000
    assert Path(f"{machine.record}.port").read_text() == f"{port}\n"
    assert f"rendezvous localhost:{port}," in result.stdout
    assert (
        "slurm.sbatch: MASTER_PORT=11111 of the submitting shell is not used: the port comes from the job id "
        "(CCLM_MASTER_PORT sets one)\n" in result.stderr
    )
    env["CCLM_MASTER_PORT"] = "12345"
    Path(f"{machine.record}.srun").unlink()
    result, _ = recording_sbatch(machine, env, ["configs/pretrain/demo.yaml"])
    assert Path(f"{machine.record}.port").read_text() == "12345\n"
    assert "MASTER_PORT=11111" not in result.stderr


# ------------------------------------------------------------------- a tester's faults: hostfile, GPU counting
def test_multi_node_reads_a_crlf_hostfile_with_a_blank_first_line_as_deepspeed_does(machine):
    """A hostfile saved on Windows (CRLF line ends) with a comment and a blank line before the first host:
    MASTER_ADDR is that host, as DeepSpeed's own parser (which strips every line) reads the file."""
    stand_in(machine.fake, "deepspeed", RECORD_ARGS)
    hostfile = machine.tmp / "hostfile"
    hostfile.write_bytes(b"# cluster nodes\r\n\r\n  \t\r\nnode01 slots=8\r\nnode02 slots=8\r\n")
    result = run_script(machine, "multi_node.sh", "configs/pretrain/cclm_4m.yaml", HOSTFILE=str(hostfile))
    assert result.returncode == 0, result.stderr
    assert option(recorded(machine), "--master_addr") == "node01"
    from deepspeed.launcher.runner import fetch_hostfile

    assert next(iter(fetch_hostfile(str(hostfile)))) == "node01"


def test_multi_node_without_a_host_in_the_hostfile_says_so(machine):
    stand_in(machine.fake, "deepspeed", RECORD_ARGS)
    hostfile = machine.tmp / "hostfile"
    hostfile.write_bytes(b"# no nodes yet\r\n\r\n")
    result = run_script(machine, "multi_node.sh", "c.yaml", HOSTFILE=str(hostfile))
    assert (result.returncode, result.stderr) == (
        1,
        f"multi_node.sh: no host in hostfile {hostfile} (see launch/hostfile.example)\n",
    )
    assert not machine.record.exists()


@pytest.mark.parametrize(
    "devices, count",
    [
        ("0,1", 2),
        ("0,1,", 2),  # CUDA stops at the empty entry
        ("0,-1,2", 1),  # ... at a negative one
        ("NoDevFiles", 0),  # what some schedulers set on a node without GPUs
        ("-1", 0),
        ("", 0),
        ("0,,1", 1),
        ("GPU-8932f937-d72c-4106-c12f-20bd9faed9f6,MIG-GPU-8932f937/1/0,MIG-5c89d3e1-0c2a,3", 4),
        ("1,GPU,2", 1),  # "GPU" alone is no UUID
    ],
)
def test_gpus_counts_cuda_visible_devices_as_cuda_reads_it(machine, devices, count):
    result = subprocess.run(
        [BASH, "-c", f'source {LAUNCH / "gpus.sh"}; count_gpus; echo "$GPU_COUNT"'],
        env={**machine.env, "CUDA_VISIBLE_DEVICES": devices},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{count}\n", "")


def test_torchrun_with_a_trailing_comma_in_cuda_visible_devices_starts_one_process_per_gpu(machine):
    stand_in(machine.fake, "torchrun", RECORD_ARGS)
    assert run_script(machine, "torchrun.sh", "c.yaml", CUDA_VISIBLE_DEVICES="0,1,").returncode == 0
    assert option(recorded(machine), "--nproc_per_node") == "2"
    result = run_script(machine, "torchrun.sh", "c.yaml", CUDA_VISIBLE_DEVICES="NoDevFiles")
    assert result.returncode == 0 and option(recorded(machine), "--nproc_per_node") == "1"
    assert (
        "torchrun.sh: no GPU found (CUDA_VISIBLE_DEVICES='NoDevFiles'): starting 1 CPU process"
        in result.stderr
    )


# ------------------------------------------------------------ a reviewer's faults: which GPUs, which node rank
DEEPSPEED_RUNNER = """\
# DeepSpeed's own launcher: deepspeed.launcher.runner.main, which starts deepspeed.launcher.launch, which starts
# the processes. Faked: the device count (a node with 4 GPUs, counted as torch counts them through NVML) and the
# training module (a probe that records what each process got).
import os, sys
import deepspeed.launcher.runner as runner

real = runner.get_accelerator()


class FourGPUs:
    def __getattr__(self, name):
        return getattr(real, name)

    def device_count(self):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return 4
        count = 0
        for entry in visible.split(","):
            if not entry.isdigit() or int(entry) >= 4:
                break
            count += 1
        return count


runner.get_accelerator = FourGPUs
sys.exit(runner.main(["launch_probe" if arg == "cclm.train.cli" else arg for arg in sys.argv[1:]]))
"""
LAUNCH_PROBE = """\
import json, os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES")
record = {key: os.environ.get(key) for key in keys}
with open(f"{os.environ['RECORD']}.rank{os.environ['RANK']}", "w") as out:
    json.dump({**record, "args": sys.argv[1:]}, out)
"""


def deepspeed_processes(machine, **env) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """single_node.sh through DeepSpeed's real launcher on a 4-GPU "node": what each training process got."""
    for old in machine.tmp.glob("record.rank*"):
        old.unlink()
    result = run_script(machine, "single_node.sh", "c.yaml", "train.max_steps=5", **env)
    return result, [json.loads(path.read_text()) for path in sorted(machine.tmp.glob("record.rank*"))]


def test_single_node_runs_on_the_gpus_cuda_visible_devices_names(machine):
    """A scheduler gave the job GPUs 2 and 3 of a 4-GPU node. single_node.sh passed `--num_gpus 2`, and
    DeepSpeed's launcher, given --num_gpus, drops CUDA_VISIBLE_DEVICES and gives its processes GPUs 0 and 1:
    another job's."""
    (machine.tmp / "runner.py").write_text(DEEPSPEED_RUNNER)
    probe = machine.tmp / "probe"
    probe.mkdir()
    (probe / "launch_probe.py").write_text(LAUNCH_PROBE)
    stand_in(
        machine.fake,
        "deepspeed",
        f'export PYTHONPATH={probe}\nexec {sys.executable} {machine.tmp / "runner.py"} "$@"\n',
    )
    result, processes = deepspeed_processes(machine, CUDA_VISIBLE_DEVICES="2,3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [(p["RANK"], p["LOCAL_RANK"], p["WORLD_SIZE"]) for p in processes] == [
        ("0", "0", "2"),
        ("1", "1", "2"),
    ]
    assert [p["CUDA_VISIBLE_DEVICES"] for p in processes] == [
        "2,3",
        "2,3",
    ]  # each uses cuda:LOCAL_RANK of these
    assert processes[0]["args"] == ["--local_rank=0", "c.yaml", "train.max_steps=5"]
    assert "ignoring it" not in result.stdout  # DeepSpeed's "Detected VISIBLE_DEVICES=... but ignoring it"
    assert "single_node.sh: 2 process(es) on GPU(s) 2,3 (CUDA_VISIBLE_DEVICES='2,3')" in result.stderr

    # fewer processes than visible GPUs: the first ones listed
    result, processes = deepspeed_processes(machine, CUDA_VISIBLE_DEVICES="3, 1,0", NUM_GPUS="2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(processes[0]["CUDA_VISIBLE_DEVICES"].split(",")) == ["1", "3"]
    assert [p["RANK"] for p in processes] == ["0", "1"]


def test_single_node_passes_the_entries_of_cuda_visible_devices_to_deepspeed(machine):
    stand_in(
        machine.fake, "deepspeed", RECORD_ARGS + 'echo "${CUDA_VISIBLE_DEVICES-unset}" > "$RECORD.cvd"\n'
    )
    assert run_script(machine, "single_node.sh", "c.yaml", CUDA_VISIBLE_DEVICES="0,3,5,").returncode == 0
    args = recorded(machine)
    assert option(args, "--include") == "localhost:0,3,5" and "--num_gpus" not in args
    assert Path(f"{machine.record}.cvd").read_text() == "unset\n"
    # only the entries used need be indexes
    result = run_script(
        machine, "single_node.sh", "c.yaml", CUDA_VISIBLE_DEVICES="01,MIG-5c89d3e1-0c2a", NUM_GPUS="1"
    )
    assert result.returncode == 0, result.stderr
    assert option(recorded(machine), "--include") == "localhost:1"
    # without CUDA_VISIBLE_DEVICES the processes take the node's first NUM_GPUS GPUs, as before
    assert run_script(machine, "single_node.sh", "c.yaml", NUM_GPUS="2").returncode == 0
    assert option(recorded(machine), "--num_gpus") == "2" and "--include" not in recorded(machine)


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"CUDA_VISIBLE_DEVICES": "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6,GPU-5c89d3e1-0c2a"},
            "single_node.sh: CUDA_VISIBLE_DEVICES='GPU-8932f937-d72c-4106-c12f-20bd9faed9f6,GPU-5c89d3e1-0c2a' "
            "names GPU GPU-8932f937-d72c-4106-c12f-20bd9faed9f6 by its UUID, and the DeepSpeed launcher takes GPU "
            "indexes only: use launch/torchrun.sh (torchrun keeps CUDA_VISIBLE_DEVICES as it is), or give "
            "CUDA_VISIBLE_DEVICES as indexes (nvidia-smi -L lists them)\n",
        ),
        (
            {"CUDA_VISIBLE_DEVICES": "1,MIG-GPU-8932f937/1/0"},
            "single_node.sh: CUDA_VISIBLE_DEVICES='1,MIG-GPU-8932f937/1/0' names GPU MIG-GPU-8932f937/1/0 by its "
            "UUID, and the DeepSpeed launcher takes GPU indexes only: use launch/torchrun.sh (torchrun keeps "
            "CUDA_VISIBLE_DEVICES as it is), or give CUDA_VISIBLE_DEVICES as indexes (nvidia-smi -L lists them)\n",
        ),
        (
            {"CUDA_VISIBLE_DEVICES": "2,3", "NUM_GPUS": "4"},
            "single_node.sh: NUM_GPUS=4 but CUDA_VISIBLE_DEVICES='2,3' makes 2 GPU(s) visible: set NUM_GPUS to 2 "
            "or fewer, or leave it unset\n",
        ),
        (
            {"CUDA_VISIBLE_DEVICES": "2,02"},
            "single_node.sh: CUDA_VISIBLE_DEVICES='2,02' lists GPU 2 twice\n",
        ),
        ({"NUM_GPUS": "two"}, "single_node.sh: NUM_GPUS='two' is not a number of processes (1 or more)\n"),
    ],
    ids=["uuids", "mig", "more-than-visible", "twice", "not-a-number"],
)
def test_single_node_refuses_gpus_the_deepspeed_launcher_cannot_place(machine, env, message):
    stand_in(machine.fake, "deepspeed", RECORD_ARGS)
    result = run_script(machine, "single_node.sh", "c.yaml", **env)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message)
    assert not machine.record.exists()


@pytest.mark.parametrize(
    "missing, message",
    [
        (  # each node waited in silence for a rendezvous on itself (127.0.0.1)
            "MASTER_ADDR",
            "torchrun.sh: NNODES=2 but MASTER_ADDR is not set: set it on every node to the address of the node "
            "with NODE_RANK=0\n",
        ),
        (  # every node fell back to --node_rank 0: a 10-minute hang, then a store timeout not naming NODE_RANK
            "NODE_RANK",
            "torchrun.sh: NNODES=2 but NODE_RANK is not set: set it on every node, 0 on the node at "
            "MASTER_ADDR=node01 and 1, 2, ... on the others (a different one on each)\n",
        ),
    ],
)
def test_torchrun_on_several_nodes_without_its_rendezvous_settings_is_refused(machine, missing, message):
    stand_in(machine.fake, "torchrun", RECORD_ARGS)
    given = {"NNODES": "2", "MASTER_ADDR": "node01", "NODE_RANK": "1", "NPROC": "1"}
    for absent in ({}, {missing: ""}):  # unset, or set to nothing
        settings = {k: v for k, v in given.items() if k != missing} | absent
        result = run_script(machine, "torchrun.sh", "c.yaml", **settings)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", message)
        assert not machine.record.exists()
    result = run_script(machine, "torchrun.sh", "c.yaml", **given)
    assert result.returncode == 0, result.stderr
    args = recorded(machine)
    options = ("--nnodes", "--node_rank", "--master_addr", "--master_port")
    assert [option(args, o) for o in options] == ["2", "1", "node01", "29500"]
    assert run_script(machine, "torchrun.sh", "c.yaml", NPROC="1").returncode == 0  # one node needs neither
    assert option(recorded(machine), "--node_rank") == "0"
