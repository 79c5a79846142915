"""What FedEx-LoRA and FLoRA share: each round the server folds a low-rank update into the
frozen base weights, and every client folds the same update into its own copy of the base.

The update of round t travels down as factors, Delta W_t = P_t @ Q_t per LoRA module (the LoRA
scale folded into P), in the train message's `extras` record (so its bytes are counted). A
client keeps its base (the target modules' weights and the last round it folded in) on its own
disk between rounds, like FedKDLoRA's client teacher, and the server sends it every update since
it last sent to that client; a client that finds a round missing says so and its reply is
dropped (e.g. after a simulated `dropout`, which these algorithms therefore refuse).
"""

from __future__ import annotations

import weakref

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from fedtune.algorithms.aggregate import State
from fedtune.algorithms.fedlora import FedLoRA
from fedtune.models import save_merged
from fedtune.train import LocalWork, seed_everything

VERSION = "__round__"  # key of the kept base: the last round whose update it holds
# Model -> its LoRA modules' base weights as built, before any update was folded in. A side table,
# not an attribute: a process may hold several models (the server's, each client rank's), and a
# client that has no kept base yet starts from these.
_PRISTINE: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA module prefix (as in the travelling state's keys) -> its frozen base weight (a live view)."""
    return {name: module.base_layer.weight.data for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


def factor_key(server_round: int, prefix: str, which: str) -> str:
    return f"{server_round}/{prefix}/{which}"


def fold_in(base: dict[str, torch.Tensor], factors: State, from_round: int) -> int:
    """Add every round's P @ Q in `factors` (rounds after `from_round`, in order) to `base` in
    place; the last round folded in. Refuses a gap: a round missing between them."""
    rounds = sorted({int(k.split("/", 1)[0]) for k in factors if int(k.split("/", 1)[0]) > from_round})
    if rounds and rounds != list(range(from_round + 1, rounds[-1] + 1)):
        missing = sorted(set(range(from_round + 1, rounds[-1] + 1)) - set(rounds))
        raise RuntimeError(f"this client's base holds the updates up to round {from_round} but the update of "
                           f"round(s) {missing} never reached it; it cannot rejoin this run")
    for t in rounds:
        for prefix, weight in base.items():
            p, q = factors[factor_key(t, prefix, "P")], factors[factor_key(t, prefix, "Q")]
            weight += (p.double() @ q.double()).to(weight.device, weight.dtype)
    return rounds[-1] if rounds else from_round


class MergesIntoBase(FedLoRA):
    """FedLoRA whose server folds `round_update(states, weights)` into the base every round."""

    def __init__(self, settings):
        super().__init__(settings)
        if settings.dropout > 0 or settings.dp_noise > 0 or settings.secure_aggregation != "none":
            raise ValueError(f"{self.name} builds each round's base update from every client's own factors and "
                             f"every client folds it into its base: it needs dropout=0 (no skipped round), "
                             f"dp-noise=0 and secure-aggregation=none (the factors are not private)")
        if settings.server_finetune_steps > 0:
            raise ValueError(f"{self.name} keeps the server's base in step with every client's through the round's "
                             f"factors; server-side fine-tuning would change the server's model outside them: use "
                             f"server-finetune-steps=0")
        self.updates: dict[int, State] = {}  # round -> its factors (P, Q per module)
        self.sent_until: dict[int, int] = {}  # partition -> last round whose update it was sent
        self.pending: State = {}  # this round's factors, from `aggregate` until `server_update`

    def build_model(self, settings) -> nn.Module:
        model = super().build_model(settings)
        _PRISTINE[model] = {k: w.clone() for k, w in base_weights(model).items()}  # before any update
        return model

    def round_update(self, states: list[State], weights: list[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module prefix -> (P, Q): the low-rank update of the base for this round's client states."""
        raise NotImplementedError

    def stage(self, states: list[State], weights: list[float]) -> None:
        """Compute this round's base update (called by `aggregate`); applied in `server_update`."""
        self.pending = {f"{prefix}/{which}": factor for prefix, (p, q) in self.round_update(states, weights).items()
                        for which, factor in (("P", p), ("Q", q))}

    # ---- server ----------------------------------------------------------------------------
    def server_update(self, model: nn.Module, state: State, server_round: int,
                      previous: State) -> tuple[State, dict[str, float]]:
        self.updates[server_round] = {f"{server_round}/{k}": v for k, v in self.pending.items()}
        fold_in(base_weights(model), self.updates[server_round], server_round - 1)
        return state, {}

    def downlink_extras(self, partition_id: int, server_round: int) -> State:
        since = self.sent_until.get(partition_id, 0)
        self.sent_until[partition_id] = server_round - 1
        return {k: v for t in range(since + 1, server_round) for k, v in self.updates.get(t, {}).items()}

    def checkpoint_state(self) -> State:
        sent = torch.tensor([[p, t] for p, t in sorted(self.sent_until.items())], dtype=torch.long).reshape(-1, 2)
        return {**{k: v for update in self.updates.values() for k, v in update.items()}, "sent-until": sent}

    def restore(self, state: State, model: nn.Module) -> None:
        self.sent_until = {int(p): int(t) for p, t in state.get("sent-until", torch.zeros(0, 2)).tolist()}
        self.updates = {}
        for key, value in state.items():
            if key != "sent-until":
                self.updates.setdefault(int(key.split("/", 1)[0]), {})[key] = value
        base = base_weights(model)  # a new process: fold every update in again
        for prefix, weight in base.items():
            weight.copy_(_PRISTINE[model][prefix])
        for t in sorted(self.updates):
            fold_in(base, self.updates[t], t - 1)

    def save_model(self, model: nn.Module, folder) -> None:
        """The updated base with the LoRA merged in: plain transformers weights."""
        save_merged(model, folder)

    # ---- client ----------------------------------------------------------------------------
    def local_train(self, model: nn.Module, rows, global_state: State, *, seed: int, lr: float, steps: int,
                    kept_state: State | None, extras: State) -> LocalWork:
        """Bring this client's base up to date (its kept base, or the pristine one, plus the
        updates it was sent), train as FedLoRA, and keep the base for the next round."""
        base = base_weights(model)
        kept = kept_state or {}
        for prefix, weight in base.items():
            weight.copy_(kept.get(prefix, _PRISTINE[model][prefix]))
        version = fold_in(base, extras, int(kept[VERSION]) if VERSION in kept else 0)
        seed_everything(seed)
        work = super().local_train(model, rows, global_state, seed=seed, lr=lr, steps=steps, kept_state=None,
                                   extras={})
        work.kept_state = {**{k: w.cpu().clone() for k, w in base.items()}, VERSION: torch.tensor(version)}
        return work
