"""Mixed-precision search (`qspeech search`): the bits of every quantized module under a storage or runtime
budget. sensitivity.py measures (and caches) the damage of each module alone at each bit width, solve.py
allocates exactly (a multiple-choice knapsack), plan.py prices the choices with the project's accounting and
writes the plan as a config `qspeech run` takes. config.py is the schema of conf/search.yaml."""

from qspeech.search.plan import main
from qspeech.search.solve import Infeasible, Solution, solve

__all__ = ["Infeasible", "Solution", "main", "solve"]
