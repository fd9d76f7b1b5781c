#!/bin/bash
# Mugs ViT-L/16, 250 epochs (paper Table 1): 5 nodes x 8 GPUs x 16 images = global batch 640.
# Flags: configs/table1.py ("vit_large_250ep"); everything is overridable, see slurm/launch.sh and the README.
# Submit from the repository root: sbatch slurm/vit_large_250ep.sh   (logs: slurm/logs/slurm-%x-%j.out)
# Fewer GPUs, same global batch (e.g. 10 x 64): sbatch --nodes=2 --gpus-per-node=5 slurm/vit_large_250ep.sh keeps
#   the lr, the images per step, the queue/memory/centre updates and the losses; drop-path and crop draws differ
#   (other per-rank streams), memory per GPU grows ~4x (README, "Fewer GPUs at a larger per-GPU batch")
# Online k-NN monitor (off unless KNN_VAL_PATH is set): KNN_VAL_PATH=/datasets/imagenet/val sbatch ... adds
#   --knn_every_epochs 1 --knn_train_path $DATA_PATH --knn_val_path $KNN_VAL_PATH --knn_subset_per_class 10
#   (10 train + 10 val images per class; KNN_EVERY_EPOCHS/KNN_TRAIN_PATH/KNN_SUBSET_PER_CLASS change it)
#SBATCH --job-name=mugs-vit_large_250ep
#SBATCH --nodes=5
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/slurm-%x-%j.out
trap 'MUGS_SIGNAL=USR1' USR1  # first: the time-limit warning can arrive in the job's first second
RUN=vit_large_250ep
source "${MUGS_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" || { echo "submit from the repo root or set MUGS_ROOT"; exit 2; }
