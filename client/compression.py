"""Client side of update compression: encode the reply's model as a delta, just before sealing.

The client sends ``codec.encode(local - global + residual)`` in place of its ``"arrays"`` record
(:mod:`fedvault.compression`). With an error-feedback codec (``topk``) the residual, what the
payload did not carry (``corrected - decode(payload)``), is kept in Flower's ``context.state``
under :data:`RESIDUAL` and added to the next round's delta (Seide et al. 2014; Karimireddy et
al., ICML 2019); a residual whose keys or shapes no longer match the model restarts at zero.
The residual lives only as long as the node's context: fedvault does not checkpoint it, so after
a resume (or a SuperNode restart) it restarts at zero, which loses at most one residual's worth of
update and is safe. Under DP-SGD this is all post-processing of private updates.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedvault.compression import Codec, to_records
from fedvault.protocol import ARRAYS
from fedvault.strategies.arrays import NDArrays, to_ndarrays, to_record

RESIDUAL = "fedvault.compression.residual"


def compress_reply(codec: Codec | None, content: RecordDict, reference: ArrayRecord, state: RecordDict) -> RecordDict:
    """``content`` with its ``"arrays"`` replaced by the encoded delta against ``reference`` (the
    global model of the instruction); unchanged when ``codec`` is None or there are no arrays."""
    if codec is None or ARRAYS not in content.array_records:
        return content
    like = to_ndarrays(reference)
    local = to_ndarrays(content.array_records[ARRAYS])
    corrected = {key: np.subtract(value, like[key]) for key, value in local.items()}
    residual = _residual(state, corrected) if codec.error_feedback else {}
    for key, value in residual.items():
        corrected[key] += value
    payload = codec.encode(corrected)
    if codec.error_feedback:
        sent = codec.decode(payload, corrected)
        state[RESIDUAL] = to_record({key: corrected[key] - sent[key] for key in corrected})
    return to_records(content, codec, payload, ARRAYS)


def _residual(state: RecordDict, delta: NDArrays) -> NDArrays:
    """The kept residual, if it still fits ``delta`` (same keys, shapes and dtypes), else none."""
    if RESIDUAL not in state.array_records:
        return {}
    residual = to_ndarrays(state.array_records[RESIDUAL])
    fits = residual.keys() == delta.keys() and all(
        residual[k].shape == delta[k].shape and residual[k].dtype == delta[k].dtype for k in delta
    )
    return residual if fits else {}
