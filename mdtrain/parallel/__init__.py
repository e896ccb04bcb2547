"""Process groups, data-parallel engines (DDP, FSDP2, DeepSpeed ZeRO) and tensor parallelism, applied from outside the models."""
from mdtrain.parallel.dist import DistContext, init_distributed
from mdtrain.parallel.engines import Engine, build_engine

__all__ = ["DistContext", "Engine", "build_engine", "init_distributed"]
