"""Launchers: submitit/SLURM jobs (``slurm.py``) and the ``launch:`` config section; the deepspeed / torchrun / sbatch
shell scripts live in the repository's top-level ``launch/`` folder."""
