"""How to start an example script on one or several processes: the one source of the launch lines that both
scripts' ``--help`` and README.md show (``tests/examples/test_docs.py`` checks that the README shows these lines
and no other launch line, and runs the CPU ones).

Lines that would silently start fewer processes than they ask for are left out: on a machine without GPUs
``accelerate launch --num_processes 2`` (with or without ``--cpu``) starts one process; it takes ``--multi_gpu``,
accelerate's multi-process launcher, and the scripts' own ``--use_cpu`` after the script name.
"""

from __future__ import annotations

__all__ = ["CPU_LAUNCH_LINES", "GPU_LAUNCH_LINES", "launch_help", "launch_lines"]

# {script} is the script's file name, {args} its arguments. Each entry: (line, what it is for).
GPU_LAUNCH_LINES = (
    ("torchrun --nproc_per_node 8 {script} {args}", "8 GPUs on one machine"),
    ("accelerate launch --num_processes 8 {script} {args}", "the same with accelerate"),
    ("accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip HOST --num_processes 16 {script} {args}",
     "two machines of 8 GPUs (machine_rank 1 on the second)"),
    ("accelerate launch --config_file docs/accelerate/fsdp2.yaml {script} {args}",
     "FSDP2: parameters, gradients and optimizer state sharded over the GPUs"),
    ("accelerate launch --config_file docs/accelerate/zero3.yaml {script} {args}",
     "DeepSpeed ZeRO-3 (pip install 'labo-hf[deepspeed]')"),
)
CPU_LAUNCH_LINES = (
    ("torchrun --nproc_per_node 2 {script} {args} --use_cpu", "2 processes on a CPU-only machine (gloo)"),
    ("accelerate launch --multi_gpu --num_processes 2 {script} {args} --use_cpu", "the same with accelerate"),
)


def launch_lines(script: str, args: str = "...") -> list[str]:
    """Every launch line, GPU ones first, for `script` with the arguments `args`."""
    return [line.format(script=script, args=args) for line, _ in (*GPU_LAUNCH_LINES, *CPU_LAUNCH_LINES)]


def launch_help(script: str, args: str = "...") -> str:
    """The "Several processes" section of a script's ``--help``."""
    rows = [f"    # {why}\n    {line.format(script=script, args=args)}" for line, why in (*GPU_LAUNCH_LINES,
                                                                                         *CPU_LAUNCH_LINES)]
    return (
        "\nSeveral processes: the same arguments under a launcher, one output folder for the whole job::\n\n"
        + "\n".join(rows)
        + "\n\nWithout GPUs, --use_cpu is required (without it each process would run alone on the same output "
        "folder, which the script refuses), and accelerate needs --multi_gpu, its multi-process launcher: without "
        "it, it starts a single process, and the script warns.\n"
    )
