#!/bin/bash
# Multi-node mdtrain pretraining with plain sbatch + srun, for clusters without submitit. Edit the #SBATCH lines,
# activate mdtrain's environment (sbatch passes your PATH on), then:
#
#   sbatch launch/sbatch_example.sh CONFIG.yaml [key=value ...]
#
# One task per GPU: srun starts `mdtrain train` once per task, and mdtrain forms the process group from SLURM's
# variables (rank SLURM_PROCID, world SLURM_NTASKS, local rank SLURM_LOCALID, master = first host of the node list,
# port derived from the job id). Time limits: SLURM sends USR2 to every task 120 s before the limit; mdtrain saves
# a checkpoint and exits with status 143; this script then requeues the job, and the requeued job resumes from that
# checkpoint (same command, same train.run_dir). Preemption (SIGTERM) also checkpoints; SLURM requeues those itself.
#SBATCH --job-name=mdtrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=4:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
##SBATCH --partition=...   --account=...   --qos=...   --constraint=...

MAX_REQUEUES=${MAX_REQUEUES:-20}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: mdtrain train $*"

# --kill-on-bad-exit=0: every rank exits with 143 on its own after the checkpoint, so srun returns 143 (a rank killed
# because another exited first would make it 137 and the job would not be requeued)
srun --kill-on-bad-exit=0 mdtrain train "$@"
rc=$?
if [ $rc -eq 143 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
  echo "checkpoint saved at the time limit: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit $rc
