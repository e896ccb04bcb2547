"""Process groups, data-parallel engines (DDP, FSDP2, DeepSpeed ZeRO) and tensor parallelism, applied from outside the models."""
