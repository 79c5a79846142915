"""Federated algorithms, one module each, found by name through the registry."""

from fedtune.algorithms.base import Algorithm, algorithm_names, describe_algorithms, get_algorithm, register
from fedtune.algorithms import (fedadam, fedavg, fedex_lora, fedkdlora, fedlora, fedprox, ffa_lora,  # noqa: F401
                                flexlora, flora, hetlora)  # importing registers them

__all__ = ["Algorithm", "algorithm_names", "describe_algorithms", "get_algorithm", "register"]
