"""Fine-tuning over several processes or machines: the finetune task writes an accelerate config and a job file
into the run's folder and runs `accelerate launch` on this module, whose ranks each train their share of every
step (tasks/training.py's `fit`). Rank 0 alone logs to MLflow, writes checkpoints and the merged weights; a
killed run resumes from its last checkpoint as a single-process run does. Other machines join a run with
`tuneline finetune-rank RUN_FOLDER --machine-rank K` (`join`), reading the same job file on a shared filesystem.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tasks.training_config import DistributedConfig

JOB_FILE = "job.json"


def accelerate_config(dist: DistributedConfig, device: str, bf16: bool) -> dict:
    """accelerate's config file for this machine. On a CPU the ranks are started by torchrun as on GPUs
    (accelerate's own CPU launcher needs MPI) and DDP talks over gloo: the ranks set `use_cpu` themselves."""
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_processes": dist.num_processes,
        "num_machines": dist.num_machines,
        "machine_rank": dist.machine_rank,
        "main_process_ip": dist.main_process_ip,
        "main_process_port": dist.main_process_port,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": "bf16" if bf16 else "no",
        "use_cpu": False,
        "gpu_ids": "all",
    }
    if dist.strategy == "fsdp":
        config.update(distributed_type="FSDP", fsdp_config={
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False})
    elif dist.strategy.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401  (an optional dependency: only these strategies need it)
        except ImportError:
            raise RuntimeError(f"finetune.distributed.strategy {dist.strategy} needs DeepSpeed: "
                               "pip install deepspeed (on the GPU machines)") from None
        config.update(distributed_type="DEEPSPEED", deepspeed_config={
            "zero_stage": int(dist.strategy[-1]), "gradient_accumulation_steps": "auto",
            "offload_optimizer_device": "none", "offload_param_device": "none", "zero3_init_flag": False,
            "zero3_save_16bit_model": True})
    if device == "cpu" and dist.strategy != "ddp":
        raise ValueError(f"finetune.distributed.strategy {dist.strategy} needs GPUs; on a CPU use ddp")
    return config


def _die_with_parent() -> None:
    """In the launcher's child: receive SIGTERM when the process that launched it dies, so a killed lifecycle
    leaves no ranks training behind it into the folder a restarted run resumes from (Linux's prctl)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _ranks(folder: Path, dist: DistributedConfig, device: str, bf16: bool) -> None:
    """Run this machine's ranks with `accelerate launch` and wait; an error names the machine and its log."""
    config = folder / f"accelerate-machine{dist.machine_rank}.yaml"
    config.write_text(yaml.safe_dump(accelerate_config(dist, device, bf16), sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) * dist.num_machines
                                                     // dist.num_processes)))
    if dist.network_interface:
        env.update(GLOO_SOCKET_IFNAME=dist.network_interface, NCCL_SOCKET_IFNAME=dist.network_interface)
    log = folder / f"machine{dist.machine_rank}.log"
    with open(log, "ab") as out:
        code = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                               "-m", "tasks.distributed", str(folder / JOB_FILE)], env=env, stdout=out,
                              stderr=subprocess.STDOUT,
                              preexec_fn=_die_with_parent if sys.platform == "linux" else None).returncode
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"distributed fine-tuning failed on machine {dist.machine_rank} (exit {code}); "
                           f"the end of its log {log}:\n{tail}")


def launch(job: dict, folder: Path, dist: DistributedConfig, device: str, bf16: bool) -> None:
    """Write the job (what `fit` trains and how) and run this machine's ranks of it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / JOB_FILE).write_text(json.dumps(job, indent=2))
    _ranks(folder, dist, device, bf16)


def join(run_folder: str | Path, machine_rank: int, wait_s: float = 600, interface: str | None = None) -> None:
    """Machine `machine_rank`'s ranks of the distributed run in `run_folder`, once machine 0 has written its
    job (waits up to `wait_s`): the same job file, this machine's rank (and network `interface`, where its
    NIC is named differently from machine 0's)."""
    if machine_rank < 1:
        raise ValueError("machine 0 runs the lifecycle, which launches its ranks itself; join with rank 1 or above")
    folder = Path(run_folder) / "launch"
    deadline = time.monotonic() + wait_s
    while not (folder / JOB_FILE).is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no job in {folder} after {wait_s:.0f} s: start the run on machine 0 first")
        time.sleep(1)
    job = json.loads((folder / JOB_FILE).read_text())
    here = {"machine_rank": machine_rank} | ({"network_interface": interface} if interface else {})
    dist = DistributedConfig.model_validate(job["spec"]["distributed"] | here)
    _ranks(folder, dist, job["device"], job["settings"]["bf16"])


def _rank_main(job_path: str) -> None:
    """One rank (accelerate launch runs this module in each process): train the job's share, rank 0 into the
    MLflow run the launching stage has open."""
    import mlflow
    import torch

    from tasks.training import fit
    from tasks.training_config import FinetuneConfig

    job = json.loads(Path(job_path).read_text())
    rank = int(os.environ.get("RANK", 0))
    print(f"rank {rank} of {os.environ.get('WORLD_SIZE', 1)} on {socket.gethostname()} "
          f"(local rank {os.environ.get('LOCAL_RANK', 0)}): training", flush=True)
    if job["device"] == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    args = (job["base_dir"], job["train_path"], job["out_dir"], FinetuneConfig.model_validate(job["spec"]),
            job["val_path"])
    if rank == 0 and job.get("mlflow_run_id"):
        mlflow.set_tracking_uri(job["mlflow_tracking_uri"])
        with mlflow.start_run(run_id=job["mlflow_run_id"]):
            fit(*args, settings=job["settings"])
    else:
        fit(*args, settings=job["settings"])


if __name__ == "__main__":
    _rank_main(sys.argv[1])
