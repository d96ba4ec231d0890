"""Started by an MPI launcher? (``mpiexec -n K fastcnn train``, ``srun --mpi=pmi2``)

``launched_world()`` tells from the environment alone, without importing any MPI: fastcnn/distributed.py
asks it first and imports mpi4py only when a launcher started several processes (so the K copies
form one MPI job, or each reports that mpi4py is missing; never K independent runs racing for one
``output.dir``).

Launchers are recognized by the world size they put in each process's environment: Open MPI
(``OMPI_COMM_WORLD_SIZE``), MPICH / Intel MPI / Slurm's PMI (``PMI_SIZE``; MPICH's hydra sets
``PMI_SIZE``, ``PMI_RANK``, ``PMI_FD``, ``MPI_LOCALNRANKS``, ``MPI_LOCALRANKID``), MVAPICH
(``MV2_COMM_WORLD_SIZE``). A world of one process (``mpiexec -n 1``) is an ordinary run.
"""
import os
from typing import Optional, Tuple

from .errors import UserError

# (size variable, rank variable) per launcher family.
_LAUNCHER_VARIABLES = (
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("PMI_SIZE", "PMI_RANK"),
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"),
)


class MultiProcessLaunch(UserError):
    """Started as one of several processes; only rank 0 prints it (``quiet`` on the others)."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank
        self.quiet = rank > 0


def launched_world() -> Optional[Tuple[str, int, int]]:
    """(size variable, world size, this process's rank) when an MPI launcher started more than one
    process, else None."""
    for size_var, rank_var in _LAUNCHER_VARIABLES:
        try:
            size = int(os.environ.get(size_var, ""))
        except ValueError:
            continue
        if size > 1:
            try:
                rank = int(os.environ.get(rank_var, "0"))
            except ValueError:
                rank = 0
            return size_var, size, rank
    return None
