"""Launchers: submitit/SLURM, scaling-law sweep jobs, deepspeed/torchrun/sbatch scripts."""
