"""Clusters: SLURM job arrays over cohorts (:mod:`volseg.hpc.slurm`) and distributed
training under torchrun (:mod:`volseg.hpc.distributed`)."""
