"""Federated algorithms, one module each, found by name through the registry.

The import order below is the registration order: the order of `fedtune compare`'s rows and of
the README's algorithm table.
"""

from fedtune.algorithms.base import Algorithm, algorithm_names, get_algorithm, register, registered
from fedtune.algorithms import (fedavg, fedlora, fedkdlora, flexlora, hetlora, ffa_lora,  # noqa: F401, I001
                                fedex_lora, flora, fedprox, fedadam, fedadam_full, feddyn)  # importing registers them

__all__ = ["Algorithm", "algorithm_names", "get_algorithm", "register", "registered"]
