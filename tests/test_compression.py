"""Update compression: each codec's error bound and size, error feedback, the wire form, corrupt
payloads rejected with a reason, and the apps' own path (client encodes then seals, server opens
then decodes, then validates) through the round loop."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from strategy_helpers import InstantGrid

from fedvault.client.app import build_client_app
from fedvault.client.compression import RESIDUAL, compress_reply
from fedvault.client.policy import ClientPolicy
from fedvault.compression import CODECS, COMPRESSED, PayloadError, _hadamard, encoded_bytes, from_records, make_codec
from fedvault.config import CompressionConfig, RunConfig
from fedvault.protocol import ARRAYS, METRICS, NUM_EXAMPLES, train_config
from fedvault.security.identity import IdentityPin, generate_identity
from fedvault.server.compression import DecodingGrid
from fedvault.server.rounds import RoundLoop, payload_bytes
from fedvault.server.sealing import SealedGrid, ServerSealing
from fedvault.strategies.arrays import to_ndarrays
from fedvault.strategies.validation import ValidationRules
from fedvault.tasks import load_task

BLOCK = 256
pytestmark = pytest.mark.usefixtures("flower_task_identity")  # replies are built in this process


def codec(name: str, **settings):
    return make_codec(CompressionConfig(codec=name, **settings))


def delta(seed: int = 0, big: int = 0) -> dict[str, np.ndarray]:
    """A model-like delta: arrays whose sizes are no multiple of the block, a spread of scales, a counter."""
    rng = np.random.default_rng(seed)
    arrays = {
        "conv.weight": (rng.standard_normal((25, 25, 3)) * 0.1).astype(np.float32),
        "conv.bias": (rng.standard_normal(25) * 3).astype(np.float32),
        "fc.weight": (rng.standard_normal((10, 125)) * rng.exponential(1, (10, 1))).astype(np.float32),
        "bn.num_batches_tracked": np.array([5], dtype=np.int64),
    }
    if big:
        arrays["big"] = rng.standard_normal(big).astype(np.float32)
    return arrays


def flat(arrays):
    return np.concatenate([v.ravel() for v in arrays.values() if v.dtype.kind == "f"])


def test_the_registry_is_the_configs_choice_list():
    choices = [f.metadata["choices"] for f in CompressionConfig.__dataclass_fields__.values() if f.name == "codec"][0]
    assert set(choices) == {"none", *CODECS} and make_codec(CompressionConfig()) is None


@pytest.mark.parametrize("name, relative", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_float_casts_round_trip_within_half_an_ulp(name, relative):
    x = delta()
    out = codec(name).decode(codec(name).encode(x), x)
    for key, value in x.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape
        # relative to the value; an fp16 subnormal (|x| < 2^-14) is within half its spacing, 2^-25
        assert np.all(np.abs(out[key] - value) <= relative * np.abs(value) + 2.0**-25), key


@pytest.mark.parametrize("name, levels", [("int8", 127), ("int4", 7)])
def test_blockwise_quantisation_is_within_half_a_step_of_each_blocks_absmax(name, levels):
    x = delta(big=200_001)  # several chunks (CHUNK_VALUES), an odd size, a short last block
    out = codec(name).decode(codec(name).encode(x), x)
    assert out["bn.num_batches_tracked"].tolist() == [5]  # integers go losslessly
    error, v = np.abs(flat(out) - flat(x)), flat(x)
    pad = (-v.size) % BLOCK
    absmax = np.abs(np.append(v, np.zeros(pad))).reshape(-1, BLOCK).max(axis=1)
    bound = np.repeat(absmax / levels / 2, BLOCK)[: v.size]  # |x - q s| <= s / 2, s = absmax / L
    assert np.all(error <= bound * (1 + 1e-6)) and error.max() > 0


def test_a_zero_block_and_a_tail_block_decode_exactly():
    x = {"w": np.zeros(BLOCK + 3, np.float32)}
    x["w"][-3:] = [1.0, -0.5, 0.25]  # a tail block of three values, a full block of zeros
    out = codec("int8").decode(codec("int8").encode(x), x)
    assert np.array_equal(out["w"][:BLOCK], np.zeros(BLOCK)) and np.allclose(out["w"][-3:], x["w"][-3:], atol=1 / 254)


def test_topk_sends_the_largest_magnitudes_exactly():
    x = delta()
    topk = codec("topk", top_k_fraction=0.05)
    out, v = flat(topk.decode(topk.encode(x), x)), flat(x)
    sent = out != 0
    assert sent.sum() == math.ceil(0.05 * v.size)
    assert np.array_equal(out[sent], v[sent]) and np.abs(v[sent]).min() >= np.abs(v[~sent]).max()


@pytest.mark.parametrize(
    "name, settings, ratio",
    [
        ("fp16", {}, 0.51),
        ("int8", {}, 0.26),
        ("int4", {}, 0.14),
        ("topk", {}, 0.05),
        ("rotation", {}, 0.26),
        ("rotation", {"bits": 4}, 0.14),
    ],
)
def test_encoded_size_relative_to_float32(name, settings, ratio):
    """Bytes as Flower counts an ArrayRecord (npy headers and keys included), on a 1M-value model."""
    x = delta(big=1_000_000)
    fp32 = ArrayRecord({k: Array(v) for k, v in x.items()}).count_bytes()
    content = compress_reply(codec(name, **settings), _reply(x), _record(_zeros(x)), RecordDict())
    assert encoded_bytes(content) <= ratio * fp32
    assert ARRAYS not in content.array_records and set(content.array_records) == {COMPRESSED}


def test_the_walsh_hadamard_transform_is_orthonormal_and_its_own_inverse():
    x = np.random.default_rng(3).standard_normal((3, 1024))
    y = _hadamard(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
    np.testing.assert_allclose(_hadamard(y), x, atol=1e-12)
    np.testing.assert_allclose(_hadamard(np.eye(4)) * 2, [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
def test_rotation_is_unbiased_and_within_a_step_per_rotated_coordinate(bits):
    """Suresh et al. 2017: E[decoded] = delta; each rotated coordinate is off by less than one step
    2m / (2^b - 1) of its piece, so the L2 error is below sqrt(sum of width x step^2) (orthonormal)."""
    x = delta(seed=4)
    c = codec("rotation", bits=bits)
    n = flat(x).size
    widths = [w for _, rows, w in c._segments(n) for _ in range(rows)]
    assert len(widths) > 1 and sum(widths) - n < 256  # 3150 values: 2048 + 1024 + a padded piece of 128
    runs = []
    for _ in range(64):
        payload = c.encode(x)
        steps = 2 * payload["ranges"].astype(np.float64) / ((1 << bits) - 1)
        runs.append(flat(c.decode(payload, x)))
        assert np.linalg.norm(runs[-1] - flat(x)) <= math.sqrt(np.dot(widths, steps**2)) + 1e-5
    error_of_mean = np.linalg.norm(np.mean(runs, axis=0) - flat(x))
    assert error_of_mean <= 2 * np.linalg.norm(runs[0] - flat(x)) / math.sqrt(64) + 1e-6  # shrinks like 1/sqrt(k)


def test_error_feedback_sends_every_delta_eventually():
    """Sum over rounds of what was sent + the residual == sum of the deltas (Karimireddy et al. 2019)."""
    topk, state, base = codec("topk", top_k_fraction=0.01), RecordDict(), _zeros(delta())
    sent_total, delta_total = flat(_zeros(delta())).astype(np.float64), flat(_zeros(delta())).astype(np.float64)
    for r in range(5):
        d = delta(seed=r)
        local = {k: base[k] + v for k, v in d.items()}
        content = compress_reply(topk, _reply(local), _record(base), state)
        payload, _ = from_records(content, topk)
        sent_total += flat(topk.decode(payload, base))
        delta_total += flat(d)
        residual = flat(to_ndarrays(state.array_records[RESIDUAL]))
        assert np.allclose(sent_total + residual, delta_total, atol=1e-5)
        assert np.count_nonzero(residual) > 0.9 * residual.size  # most of it was not sent this round
    assert not np.allclose(sent_total, delta_total, atol=1e-3)


def test_a_residual_that_no_longer_fits_the_model_restarts_at_zero():
    topk, base = codec("topk"), _zeros(delta())
    state = RecordDict({RESIDUAL: _record({"other": np.ones(3, np.float32)})})
    d = delta()
    content = compress_reply(topk, _reply({k: base[k] + v for k, v in d.items()}), _record(base), state)
    payload, _ = from_records(content, topk)
    assert np.allclose(flat(topk.decode(payload, base)) + flat(to_ndarrays(state[RESIDUAL])), flat(d), atol=1e-6)


# ---- corrupt payloads, through the server's wrapper ---------------------------------------------


def _zeros(x):
    return {k: np.zeros_like(v) for k, v in x.items()}


def _record(arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _reply(arrays) -> RecordDict:
    return RecordDict({ARRAYS: _record(arrays), METRICS: MetricRecord({NUM_EXAMPLES: 10})})


def _replace(content: RecordDict, field: str, value: np.ndarray | bytes) -> None:
    record = content.array_records[COMPRESSED]
    if isinstance(value, bytes):
        old = record[field]
        record[field] = Array(dtype=old.dtype, shape=old.shape, stype=old.stype, data=value)
    else:
        record[field] = Array(value)


def _payload(content: RecordDict, field: str) -> np.ndarray:
    return content.array_records[COMPRESSED][field].numpy()


def _nan_scale(content: RecordDict) -> None:
    scales = _payload(content, "scales").copy()
    scales[1] = np.nan
    _replace(content, "scales", scales)


CORRUPTIONS = {
    "int8": [
        (_nan_scale, "field 'scales' holds a negative, NaN or infinite scale"),
        (lambda c: _replace(c, "codes", _payload(c, "codes")[:-1]), "field 'codes' is int8["),
        (lambda c: _replace(c, "codes", _payload(c, "codes").astype(np.int16)), "field 'codes' is int16["),
        (
            lambda c: _replace(c, "codes", c.array_records[COMPRESSED]["codes"].data[:-40]),
            "field 'codes' cannot be loaded",
        ),
        (
            lambda c: _replace(c, "codes", np.full_like(_payload(c, "codes"), -128)),
            "field 'codes' holds a code outside",
        ),
        (lambda c: c.array_records[COMPRESSED].pop("scales"), "missing field(s) ['scales']"),
        (lambda c: _replace(c, "extra", np.zeros(3)), "unexpected field(s) ['extra']"),
        (lambda c: _replace(c, "raw.bn.num_batches_tracked", np.zeros(2, np.int64)), "field 'raw.bn.num_batches"),
        (lambda c: c.config_records["fedvault.compression"].__setitem__("codec", "int4"), "encoded with codec 'int4'"),
    ],
    "int4": [(lambda c: _replace(c, "codes", _payload(c, "codes") & 0xF0), "field 'codes' holds a code outside")],
    "rotation": [
        (lambda c: _replace(c, "ranges", _payload(c, "ranges") * np.nan), "field 'ranges' holds a negative, NaN"),
        (lambda c: _replace(c, "codes", _payload(c, "codes").astype(np.uint16)), "field 'codes' is uint16["),
        (lambda c: c.array_records[COMPRESSED].pop("seed"), "missing field(s) ['seed']"),
    ],
    "topk": [
        (lambda c: _replace(c, "indices", _payload(c, "indices") + 10**6), "field 'indices' holds an index outside"),
        (lambda c: _replace(c, "values", _payload(c, "values")[:3]), "field 'values' is float32[3]"),
    ],
}


class Replies(InstantGrid):
    """Each node answers a train instruction with ``global + delta(node)``, compressed, then corrupted."""

    def __init__(self, nodes, compressor, corrupt=None) -> None:
        super().__init__(nodes)
        self.compressor, self.corrupt = compressor, corrupt or {}

    def answer(self, msg):
        base = to_ndarrays(msg.content[ARRAYS])
        d = delta(msg.metadata.dst_node_id, big=base["big"].size if "big" in base else 0)
        local = {k: v + d[k] for k, v in base.items()}
        content = compress_reply(self.compressor, _reply(local), msg.content[ARRAYS], RecordDict())
        if msg.metadata.dst_node_id in self.corrupt:
            self.corrupt[msg.metadata.dst_node_id](content)
        reply = Message(content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        return reply


def _instructions(nodes, arrays) -> list[Message]:
    content = RecordDict({ARRAYS: _record(arrays), "config": ConfigRecord({"server-round": 1})})
    return [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]


@pytest.mark.parametrize("name, corrupt, reason", [(n, c, r) for n, cases in CORRUPTIONS.items() for c, r in cases])
def test_a_corrupt_payload_is_rejected_with_the_node_and_the_field(name, corrupt, reason):
    grid = DecodingGrid(Replies([7, 8], codec(name), corrupt={8: corrupt}), codec(name))
    base = {k: v + 1 for k, v in delta(seed=9).items()}
    replies = sorted(
        grid.send_and_receive(_instructions([7, 8], base), timeout=5), key=lambda r: r.metadata.src_node_id
    )
    assert [r.metadata.src_node_id for r in replies] == [7, 8]  # returned, so the round does not wait for it
    assert ARRAYS not in replies[1].content  # undecoded: validation could never keep it
    rebuilt = to_ndarrays(replies[0].content[ARRAYS])
    assert set(replies[0].content) == {ARRAYS, METRICS} and rebuilt.keys() == base.keys()
    received = flat(rebuilt) - flat(base)  # what node 7 sent
    if name == "rotation":  # stochastic rounding: within its error, not bit for bit
        assert np.linalg.norm(received - flat(delta(7))) <= 0.05 * np.linalg.norm(flat(delta(7)))
    else:
        assert np.allclose(received, flat(codec(name).decode(codec(name).encode(delta(7)), delta(7))), atol=1e-5)
    assert rebuilt["bn.num_batches_tracked"].tolist() == [6 + 5]
    ((reply, why),) = grid.take_rejected()
    assert reply is replies[1] and why.startswith(f"compression: node 8's {name} payload rejected: ")
    assert reason in why, why
    assert grid.take_rejected() == []


def test_payload_bytes_counts_a_decoded_reply_at_its_encoded_size():
    grid = DecodingGrid(Replies([7], codec("int8")), codec("int8"))
    sent = _instructions([7], delta(big=100_000))
    (reply,) = grid.send_and_receive(sent, timeout=5)
    full = payload_bytes([reply])
    assert grid.payload_bytes(sent) == payload_bytes(sent)  # instructions go uncompressed
    assert 0.24 * full < grid.payload_bytes([reply]) < 0.26 * full


# ---- the apps' own path, sealed, through the round loop -----------------------------------------


class Loopback(InstantGrid):
    """Hands each instruction to the real ClientApp of its node in this process (a transport, not an engine)."""

    def __init__(self, app, nodes) -> None:
        super().__init__(nodes)
        self.app = app
        self.contexts = {
            node: Context(1, node, {"partition-id": i, "num-partitions": 4}, RecordDict(), {})
            for i, node in enumerate(nodes)
        }

    def answer(self, msg):
        reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
        assert COMPRESSED not in reply.content and ARRAYS not in reply.content  # sealed: nothing readable in transit
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        return reply


@pytest.mark.parametrize("name", ["int8", "topk"])
def test_sealed_compressed_rounds_through_the_apps_and_the_loop(tmp_path, name):
    """Client encodes then seals; server opens then decodes, validates and aggregates; bytes are encoded bytes."""
    files = generate_identity(tmp_path / "identity")
    cfg = RunConfig.from_flat(
        {
            "task": "digits",
            "num-clients": 4,
            "batch-size": 32,
            "learning-rate": 0.05,
            "privacy.sample-level": False,
            "sealing.mode": "on",
            "compression.codec": name,
        }
    )
    app = build_client_app(cfg, ClientPolicy(pin=IdentityPin(files.fingerprint)))
    loopback = Loopback(app, [7, 8])
    grid = DecodingGrid(
        SealedGrid(loopback, ServerSealing(files.private_key, 1, "x25519")), make_codec(cfg.compression)
    )
    records, models = [], []
    torch.manual_seed(0)
    arrays = ArrayRecord(load_task("digits").build_model().state_dict())
    loop = RoundLoop(
        strategy=FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2),
        grid=grid,
        central_evaluate=lambda server_round, arrays: MetricRecord({}),
        on_round=lambda record, arrays: (records.append(record), models.append(to_ndarrays(arrays))),
        timeout=5,
        rules=ValidationRules(max_update_norm=100.0),
        client_evaluate=False,
    )
    loop.run(arrays, 2, lambda _round: train_config(0.05, 1, 0.0))
    for record in records[1:]:
        assert record["replies_ok"] == 2 and record["dropped"] == []
        assert record["bytes_received"] < 0.3 * record["bytes_sent"]  # two replies, each < 30 % of the model sent
    assert not np.allclose(flat(models[1]), flat(models[0]))  # the rebuilt updates moved the model
    has_residual = [RESIDUAL in c.state for c in loopback.contexts.values()]
    assert has_residual == [name == "topk"] * 2


def test_the_round_loop_drops_an_undecodable_reply_and_records_why():
    grid = DecodingGrid(Replies([7, 8], codec("int8"), corrupt={8: _nan_scale}), codec("int8"))
    records = []
    loop = RoundLoop(
        strategy=FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2),
        grid=grid,
        central_evaluate=lambda server_round, arrays: MetricRecord({}),
        on_round=lambda record, arrays: records.append(record),
        timeout=5,
        rules=ValidationRules(),
        client_evaluate=False,
    )
    loop.run(_record(delta(seed=3)), 1, lambda _round: train_config(0.05, 1, 0.0))
    (dropped,) = records[-1]["dropped"]
    assert records[-1]["replies_ok"] == 1 and records[-1]["failed_nodes"] == [] and dropped["node"] == 8
    assert "node 8's int8 payload rejected: field 'scales'" in dropped["reason"]


def test_payload_errors_are_value_errors_naming_the_field():
    x = delta()
    with pytest.raises(PayloadError, match="field 'values' is float16"):
        codec("fp16").decode({"values": np.zeros(3, np.float16), "raw.bn.num_batches_tracked": np.array([5])}, x)


def test_a_late_compressed_reply_is_recorded_as_late_and_never_aggregated():
    transport = Replies([7, 8], codec("int8"))
    transport.held = {8}  # node 8's round-1 reply misses the round's timeout
    records = []

    def on_round(record, arrays):
        records.append(record)
        if record["round"] == 1:
            transport.held = set()
            transport.release()

    loop = RoundLoop(
        strategy=FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2),
        grid=DecodingGrid(transport, codec("int8")),
        central_evaluate=lambda server_round, arrays: MetricRecord({}),
        on_round=on_round,
        timeout=0.3,
        rules=ValidationRules(),
        client_evaluate=False,
    )
    loop.run(_record(delta(seed=3)), 2, lambda _round: train_config(0.05, 1, 0.0))
    assert records[1]["replies_ok"] == 1 and records[1]["failed_nodes"] == [8]
    assert records[2]["replies_ok"] == 2 and records[2]["dropped"] == []
    assert [late["node"] for late in records[2]["late"]] == [8]
