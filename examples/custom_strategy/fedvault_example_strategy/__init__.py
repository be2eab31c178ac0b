"""An aggregation strategy written outside fedvault, loaded as a plug-in."""

from fedvault_example_strategy.clipped_fedavg import ClippedFedAvg

__all__ = ["ClippedFedAvg"]
