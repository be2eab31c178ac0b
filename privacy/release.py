"""What a private run releases: every quantity is covered by the accounted epsilon or withheld.

Sample-level DP (DP-SGD on each client, Abadi et al., CCS 2016) covers the client's update only.
A DP client's train reply therefore carries, besides the noised model and its DP event:

* ``num-examples`` and ``train_batch_size``: public by assumption, as in every DP-SGD accountant
  (the sample rate q = B/N in the reply's DP event already states them);
* ``train_steps``: logical steps, fixed by q and the epochs (empty Poisson batches included);
* ``dp_epsilon``: a function of the public event parameters;
* a strategy's client-step metrics (FedNova's tau and a-norm): computed from the noised model and
  step counts only, so post-processing.

Withheld: ``train_loss`` and ``train_seconds`` (the loss on private examples and the time of
variable-size Poisson batches are functions of the data that no accountant covers), and every
metric of local evaluation (the local test split is not even trained on, so DP-SGD covers none of
it): a DP client answers an evaluate instruction with ``num-examples`` only.

Client-level DP (DP-FedAvg, McMahan et al., ICLR 2018) covers the noised global model, with the
set of participants secret (amplification by Poisson sampling). The run directory then keeps only
the server's own figures per round (:func:`client_level_round_record`): its evaluation on the
server's held-out test set, the round's config and wall time. The clients' statistics, who was
sampled, who failed or was dropped, and the bytes moved (proportional to the sample size) are
withheld. Wall time stays: it is the operator's own measurement and a timing side channel that
this policy does not claim to close.
"""

from __future__ import annotations

from typing import Any

#: Round-record fields a client-level DP run keeps; anything else is withheld from the run directory.
CLIENT_LEVEL_ROUND_FIELDS = ("round", "train_config", "central", "seconds")


def client_level_round_record(record: dict[str, Any]) -> dict[str, Any]:
    """The part of a round record that a client-level DP run may store and print."""
    return {key: record[key] for key in CLIENT_LEVEL_ROUND_FIELDS if key in record}
