"""The five sbatch templates without a cluster: syntax, signal set-up, and the flags they launch
(parsed as train_fsdp.py parses them) against the test's own copy of the paper's Table 1."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mugs.configs.flags import parse_config

ROOT = Path(__file__).resolve().parents[1]

# Independent statement of Table 1 (docs/method.md / the paper's README), not read from configs/table1.py.
# Defaults every run shares (docs/method.md "Defaults" + the paper's pretraining.sh):
PAPER_DEFAULTS = dict(
    patch_size=16,
    lr=0.0008,
    min_lr=1e-6,
    warmup_epochs=10,
    weight_decay=0.04,
    momentum_teacher=0.996,
    clip_grad=3.0,
    drop_path_rate=0.1,
    global_crops_scale=(0.25, 1.0),
    local_crops_scale=(0.05, 0.25),
    local_crops_number=10,
    size_crops=[96],
    img_size=224,
    instance_queue_size=65536,
    local_group_queue_size=65536,
    local_group_knn_top_n=8,
    group_out_dim=65536,
    group_bottleneck_dim=256,
    group_student_temp=0.1,
    group_warmup_teacher_temp=0.04,
    instance_temp=0.2,
    local_group_temp=0.2,
    instance_out_dim=256,
    local_group_out_dim=256,
    freeze_last_layer=1,
    patch_embed_lr_mult=0.2,
    use_bn_in_head=False,
    norm_before_pred=True,
    prob=0.5,
    timm_auto_augment_par="rand-m9-mstd0.5-inc1",
    use_fp16=False,
)
# run: (nodes, GPUs per node, per-GPU batch, global batch, flags beyond the defaults)
TABLE1 = {
    "vit_small_100ep": (
        1,
        8,
        64,
        512,
        dict(
            arch="vit_small",
            epochs=100,
            group_teacher_temp=0.04,
            group_warmup_teacher_temp_epochs=0,
            weight_decay_end=0.2,
            norm_last_layer=False,
        ),
    ),
    "vit_small_300ep": (
        2,
        8,
        64,
        1024,
        dict(
            arch="vit_small",
            epochs=300,
            group_teacher_temp=0.07,
            group_warmup_teacher_temp_epochs=30,
            weight_decay_end=0.1,
            norm_last_layer=False,
        ),
    ),
    "vit_small_800ep": (
        2,
        8,
        64,
        1024,
        dict(
            arch="vit_small",
            epochs=800,
            group_teacher_temp=0.07,
            group_warmup_teacher_temp_epochs=30,
            weight_decay_end=0.1,
            norm_last_layer=False,
        ),
    ),
    "vit_base_400ep": (
        3,
        8,
        42,
        1008,
        dict(
            arch="vit_base",
            epochs=400,
            group_teacher_temp=0.07,
            group_warmup_teacher_temp_epochs=50,
            min_lr=2e-6,
            weight_decay_end=0.1,
            freeze_last_layer=3,
            norm_last_layer=False,
        ),
    ),
    "vit_large_250ep": (
        5,
        8,
        16,
        640,
        dict(
            arch="vit_large",
            epochs=250,
            lr=0.0015,
            min_lr=1.5e-4,
            group_teacher_temp=0.07,
            group_warmup_teacher_temp_epochs=50,
            weight_decay=0.025,
            weight_decay_end=0.08,
            norm_last_layer=True,
            drop_path_rate=0.3,
            freeze_last_layer=3,
            # the original's code: clip / 10 after epoch 100 for ViT-L
            clip_grad_drop_epoch=100,
            clip_grad_drop_factor=10.0,
        ),
    ),
}
TEMPLATES = {name: ROOT / "slurm" / f"{name}.sh" for name in TABLE1}


def sbatch_options(path: Path) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", path.read_text(), re.M))


def dry_run(name: str, nodes: int, gpus: int, *args: str, **env: str) -> subprocess.CompletedProcess:
    """What the template would launch inside an allocation of `nodes` nodes x `gpus` GPUs."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GPUS_PER_NODE", "EXTRA_ARGS"))}
    e.update(
        MUGS_DRY_RUN="1",
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_GPUS_ON_NODE=str(gpus),
        SLURM_JOB_ID="77",
        PYTHON=sys.executable,
        **env,
    )
    return subprocess.run(["bash", str(TEMPLATES[name]), *args], cwd=ROOT, env=e, capture_output=True, text=True)


def launched(r: subprocess.CompletedProcess):
    """(srun+mugs-train options, trainer argv) from a dry run's printed command."""
    assert r.returncode == 0, r.stderr
    tokens = shlex.split(r.stdout.strip().splitlines()[-1])
    assert "mugs.training.launch" in tokens  # the launcher that checks first
    i = tokens.index("--")
    return tokens[:i], tokens[i + 1 :]


def opt(tokens, name):
    return next(t.split("=", 1)[1] for t in tokens if t.startswith(name + "="))


@pytest.mark.process
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_syntax_and_preemption_setup(name):
    path = TEMPLATES[name]
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    o = sbatch_options(path)
    assert re.fullmatch(r"B:USR1@\d+", o["signal"]) and "requeue" in o and o["open-mode"] == "append"
    assert o["output"] == "slurm/logs/slurm-%x-%j.out" and (ROOT / "slurm" / "logs").is_dir()
    commands = [l for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert commands[0].startswith("trap ") and "USR1" in commands[0], "the USR1 trap must be the first command"
    assert sum("launch.sh" in l for l in commands) == 1 and len(commands) <= 3, "launch logic belongs in launch.sh"
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm" / "launch.sh")]).returncode == 0


@pytest.mark.process
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_launches_table1_flags_at_the_paper_shape(name):
    nodes, gpus, per_gpu, global_batch, row = TABLE1[name]
    o = sbatch_options(TEMPLATES[name])
    assert (int(o["nodes"]), int(o["gpus-per-node"]), o["ntasks-per-node"]) == (nodes, gpus, "1")
    runner, argv = launched(dry_run(name, nodes, gpus))
    assert opt(runner, "--ntasks") == str(nodes) and opt(runner, "--nnodes") == str(nodes)
    assert opt(runner, "--nproc_per_node") == str(gpus) and opt(runner, "--rdzv_backend") == "c10d"
    cfg = parse_config(argv)
    expected = {**PAPER_DEFAULTS, **row, "batch_size_per_gpu": per_gpu}
    got = {k: getattr(cfg, k) for k in expected}
    assert got == expected
    assert cfg.hsdp and cfg.device == "cuda"  # shard in node, replicate across; GPUs unless told otherwise
    assert cfg.memory_pointer == "original"  # exact reproduction of the paper code's memory
    assert nodes * gpus * cfg.batch_size_per_gpu == global_batch


@pytest.mark.process
def test_other_shapes_keep_the_global_batch_or_fail_clearly():
    runner, argv = launched(dry_run("vit_large_250ep", 10, 8))
    assert opt(runner, "--nnodes") == "10" and parse_config(argv).batch_size_per_gpu == 8  # 10 x 8 x 8 = 640
    _, argv = launched(dry_run("vit_small_300ep", 4, 4))
    assert parse_config(argv).batch_size_per_gpu == 64  # 16 GPUs either way
    r = dry_run("vit_base_400ep", 4, 8)  # 1008 images do not split over 32 GPUs
    assert r.returncode == 2 and "does not split over 32 GPUs" in r.stderr and "srun" not in r.stdout
    _, argv = launched(dry_run("vit_base_400ep", 4, 8, BATCH_SIZE_PER_GPU="32"))
    assert parse_config(argv).batch_size_per_gpu == 32
    _, argv = launched(dry_run("vit_large_250ep", 5, 8, GLOBAL_BATCH="1280"))
    assert parse_config(argv).batch_size_per_gpu == 32


@pytest.mark.process
def test_environment_overrides_and_extra_args_come_last():
    runner, argv = launched(
        dry_run(
            "vit_large_250ep",
            1,
            8,
            "--seed",
            "5",
            DATA_PATH="/d/train",
            OUTPUT_DIR="/o/run",
            GPUS_PER_NODE="2",
            EXTRA_ARGS="--lr 0.1 --arch vit_base",
            MASTER_ADDR="head",
            MASTER_PORT="1234",
        )
    )
    cfg = parse_config(argv)
    assert (cfg.data_path, cfg.output_dir, cfg.lr, cfg.arch, cfg.seed) == ("/d/train", "/o/run", 0.1, "vit_base", 5)
    assert cfg.batch_size_per_gpu == 320 and cfg.min_lr == 1.5e-4  # 640 over 2 processes; the rest stays
    assert opt(runner, "--nproc_per_node") == "2" and opt(runner, "--rdzv_endpoint") == "head:1234"
    assert opt(runner, "--rdzv_id") == "77"


@pytest.mark.process
def test_knn_monitor_is_off_by_default_and_knn_val_path_turns_it_on_with_the_suggested_subset():
    _, argv = launched(dry_run("vit_large_250ep", 5, 8))
    assert parse_config(argv).knn_every_epochs == 0
    _, argv = launched(dry_run("vit_large_250ep", 5, 8, DATA_PATH="/d/train", KNN_VAL_PATH="/d/val"))
    cfg = parse_config(argv)
    assert (cfg.knn_every_epochs, cfg.knn_train_path, cfg.knn_val_path, cfg.knn_subset_per_class) == (
        1,
        "/d/train",
        "/d/val",
        10,
    )
    _, argv = launched(
        dry_run(
            "vit_small_100ep",
            1,
            8,
            KNN_VAL_PATH="/d/val",
            KNN_EVERY_EPOCHS="5",
            KNN_SUBSET_PER_CLASS="20",
            KNN_TRAIN_PATH="/d/list.txt",
        )
    )
    cfg = parse_config(argv)
    assert (cfg.knn_every_epochs, cfg.knn_train_path, cfg.knn_subset_per_class) == (5, "/d/list.txt", 20)
