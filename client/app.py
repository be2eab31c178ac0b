"""fedvault's ClientApp: ``train`` and ``evaluate`` handlers on Flower's Message API.

Replies use Flower's usual keys so stock Flower strategies and ServerApps interoperate with
fedvault clients; the whole wire format is in :mod:`fedvault.protocol`. Training runs the task's
own loop with DP on and off (:mod:`fedvault.client.local_training`). Under sample-level DP the
replies carry only what the client's epsilon covers (:mod:`fedvault.privacy.release`). A train
reply's model is encoded as a delta when ``compression.codec`` asks (:mod:`fedvault.client.compression`),
then sealed.

What the client requires of an instruction (signed by its pinned server, sealed replies, allowed
suites, its DP floor, no replayed rounds, a task it allows) is its own policy
(:mod:`fedvault.client.policy`), checked before anything is trained or a task is imported; the
run config cannot change it. Receipts for the client's
spends ride on instructions and on the run's final ``query`` (:mod:`fedvault.client.receipts`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedvault.client.attacks import attack_update
from fedvault.client.compression import compress_reply
from fedvault.client.local_training import round_defaults, train_plain
from fedvault.client.node import (
    DataSelection,
    batch_size_for,
    client_data,
    is_update_attacker,
    node_ledger_path,
    task_and_model,
    training_data,
)
from fedvault.client.policy import ClientPolicy, PolicyRefused
from fedvault.client.receipts import keep_receipts
from fedvault.client.sealing import ClientSealing
from fedvault.client.simulated_device import SimulatedDevice
from fedvault.compression import make_codec
from fedvault.config import RunConfig
from fedvault.device import resolve_device
from fedvault.memory import keep_freed_buffers
from fedvault.plugins import PluginPolicy
from fedvault.privacy.node_ledger import NodeLedger
from fedvault.protocol import (
    ARRAYS,
    EVAL_ACCURACY,
    EVAL_LOSS,
    METRICS,
    NUM_EXAMPLES,
    POLICY_REFUSED,
    RECEIPTS_KEPT,
    TRAIN_BATCH_SIZE,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRAIN_STEPS,
    read_round_config,
    refusal,
    run_key,
)
from fedvault.strategies.client_steps import build_client_steps
from fedvault.tasks import make_loader

ConfigSource = Callable[[Context], RunConfig]


def config_from_context(context: Context) -> RunConfig:
    """The run config Flower hands the app (``flwr run``: pyproject plus ``--run-config``)."""
    return RunConfig.from_flat(dict(context.run_config))


def build_client_app(config: RunConfig | None = None, policy: ClientPolicy | None = None) -> ClientApp:
    """A ClientApp using ``config``, or the Flower run config when ``config`` is None.

    Its security policy is ``policy``; else, deployed (``config`` None), the node config's
    (:meth:`ClientPolicy.from_node_config`: sealing on unless the node says off, only the
    ``module:attr`` tasks it allows); else (a baked-in simulation config, whose one operator runs
    every party) sealing as ``config`` says, and the config's own task allowed.
    """
    get_config: ConfigSource = (lambda _ctx: config) if config is not None else config_from_context
    app = ClientApp()

    def checked(msg: Message, context: Context, kind: str) -> tuple[RunConfig, ClientPolicy, ClientSealing]:
        """The run config, the policy, and the instruction checked against it: nothing is trained for an
        unsigned, forged, relabelled or replayed instruction (these raise)."""
        keep_freed_buffers()  # this process allocates the same update-sized buffers every round
        cfg = get_config(context)
        if policy is not None:
            own = policy
        elif config is None:
            own = ClientPolicy.from_node_config(context.node_config)
        else:
            own = ClientPolicy(
                sealing=cfg.sealing.enabled(deployed=False), refuse_replays=False, plugins=PluginPolicy.simulation()
            )
        return cfg, own, ClientSealing(own, msg, context, kind)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, own, sealing = checked(msg, context, "train")
        keep_receipts(msg, cfg, context, own)
        try:
            own.check_plugins(cfg)  # before the task is imported: a task not allowed here is never loaded
            cfg = own.dp.apply(cfg)  # the run may ask for more noise than the client's floor, never less
        except PolicyRefused as exc:
            return sealing.reply(msg, refusal(exc.status, str(exc)))
        sel = DataSelection.from_run(cfg, context.node_config)
        rc = read_round_config(msg.content, round_defaults(cfg))
        simulated = SimulatedDevice.of(cfg, sel.partition_id, sel.num_partitions) if config is not None else None
        if simulated is not None and (offline := simulated.offline(rc.server_round)) is not None:
            return sealing.reply(msg, offline)
        device = resolve_device(str(context.node_config.get("device", cfg.device)))
        global_state = msg.content.array_records[ARRAYS].to_torch_state_dict()
        make_steps = lambda model: build_client_steps(msg.content, context.state, model)  # noqa: E731
        start = time.perf_counter()
        if cfg.privacy.sample_level:
            # Opacus and the accountants load only for a DP round: in deployment every message starts a
            # fresh ClientApp process, and evaluate, query and non-DP rounds need neither (about 3 s)
            from fedvault.client.private_training import REFUSALS, train_private

            ledger = NodeLedger(node_ledger_path(cfg, context.node_config))
            try:
                done = train_private(
                    cfg, sel, rc, global_state, device, ledger, run_key(cfg, context.run_id), make_steps
                )
            except REFUSALS as exc:
                paid = getattr(exc, "event", None)  # round-already-spent: what was paid, for the run ledger
                return sealing.reply(msg, refusal(exc.status, str(exc), paid))
        else:
            done = train_plain(cfg, sel, rc, global_state, device, make_steps)
        state = done.state_dict
        if is_update_attacker(cfg, sel):
            state = _attacked(cfg, sel, global_state, state, rc.server_round)

        examples = len(training_data(cfg, sel))
        batch_size = batch_size_for(cfg.batch_size, examples)
        metrics = MetricRecord(
            {TRAIN_STEPS: done.result.steps, NUM_EXAMPLES: examples, TRAIN_BATCH_SIZE: batch_size, **done.metrics}
        )
        if not cfg.privacy.sample_level:  # under DP-SGD both are functions of the data no epsilon covers
            metrics[TRAIN_LOSS], metrics[TRAIN_SECONDS] = float(done.result.loss), time.perf_counter() - start
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})
        content = RecordDict({ARRAYS: arrays, METRICS: metrics, **done.records})
        codec = make_codec(cfg.compression)  # encode, then (a simulated device's clock) then seal
        content = compress_reply(codec, content, msg.content.array_records[ARRAYS], context.state)
        if simulated is not None:
            content = simulated.finish(rc.server_round, msg.content, content, done.result.steps * batch_size)
        return sealing.reply(msg, content)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, own, sealing = checked(msg, context, "evaluate")
        keep_receipts(msg, cfg, context, own)
        try:
            own.check_plugins(cfg)
        except PolicyRefused as exc:
            return sealing.reply(msg, refusal(POLICY_REFUSED, str(exc)))
        device = resolve_device(str(context.node_config.get("device", cfg.device)))
        _, test_data = client_data(DataSelection.from_run(cfg, context.node_config))
        if cfg.privacy.sample_level:  # no epsilon covers the local test split: withheld
            return sealing.reply(msg, RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: len(test_data)})}))
        if own.dp.required:  # a non-DP run: this client alone withholds, kept out of the others' average
            return sealing.reply(msg, refusal(POLICY_REFUSED, "local test metrics withheld: no epsilon covers them"))
        task, model = task_and_model(cfg.task)
        model.load_state_dict(msg.content.array_records[ARRAYS].to_torch_state_dict())
        result = task.evaluate(model.to(device), make_loader(test_data, 256, shuffle=False), device)
        metrics = MetricRecord(
            {EVAL_LOSS: result["loss"], EVAL_ACCURACY: result["accuracy"], NUM_EXAMPLES: len(test_data)}
        )
        return sealing.reply(msg, RecordDict({METRICS: metrics}))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """The run's last word: the receipts not yet delivered with an instruction."""
        cfg, own, sealing = checked(msg, context, "query")
        kept = keep_receipts(msg, cfg, context, own)
        return sealing.reply(msg, RecordDict({METRICS: MetricRecord({RECEIPTS_KEPT: kept})}))

    return app


def _attacked(cfg: RunConfig, sel: DataSelection, global_state: dict, state: dict, server_round: int) -> dict:
    """A malicious client's reply (robustness experiments only)."""
    to_np = lambda d: {k: v.detach().cpu().numpy() for k, v in d.items()}  # noqa: E731
    seed = int(np.random.SeedSequence([cfg.seed, sel.partition_id, server_round]).generate_state(1)[0])
    tampered = attack_update(cfg.attack.kind, to_np(global_state), to_np(state), cfg.attack.scale, seed)
    return {k: torch.as_tensor(v) for k, v in tampered.items()}


app = build_client_app()
