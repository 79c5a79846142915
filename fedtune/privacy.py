"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) with Flower's own parts.

Clients clip their update to `dp-clip` (Flower's `fixedclipping_mod`, see `client_app`); the
server averages the clipped updates with equal weights and adds Gaussian noise of standard
deviation `dp-noise * dp-clip / sampled clients` (Flower's
`DifferentialPrivacyClientSideFixedClipping` wrapper). Flower's RDP accountant turns the rounds
so far into epsilon at `dp-delta`, reported every round.
"""

from __future__ import annotations

from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from fedtune.config import Settings
from fedtune.strategy import FedTuneStrategy


def private(strategy: FedTuneStrategy, settings: Settings):
    """`strategy` wrapped for DP (equal client weights), or unchanged when `dp-noise` is 0."""
    if settings.dp_noise <= 0:
        return strategy
    strategy.uniform_weights = True
    return DifferentialPrivacyClientSideFixedClipping(strategy, settings.dp_noise, settings.dp_clip,
                                                      num_sampled_clients=len(strategy.sample(1)))


class PrivacyLedger:
    """Epsilon spent so far: one Gaussian release per round that changed the global model.

    With every client sampled each round there is no amplification by sampling; with a
    fraction, sampling without replacement of that many clients out of `clients`.
    """

    def __init__(self, settings: Settings, sampled: int):
        method = SamplingMethod.NO_AMPLIFICATION if sampled == settings.clients else SamplingMethod.WITHOUT_REPLACEMENT
        relation = (NeighboringRelation.ADD_OR_REMOVE_ONE if method is SamplingMethod.NO_AMPLIFICATION
                    else NeighboringRelation.REPLACE_ONE)
        self.accountant = RdpAccountant(PrivacyConfig(target_delta=settings.dp_delta, population_size=settings.clients,
                                                      neighboring_relation=relation, sampling_method=method))
        self.event = GaussianPrivacyEvent(noise_multiplier=settings.dp_noise, sample_size=sampled,
                                          population_size=settings.clients)

    def release(self) -> float:
        """Account for one more noisy round; returns the epsilon spent in total."""
        self.accountant.compose(self.event)
        return self.accountant.get_privacy_spent().epsilon
