"""Pipeline chains priced by arithmetic: what each device holds in each role, and a chain's latency.

A single request's pipeline latency is the sum of its stages' compute plus the hand-offs between
them; the first stage also embeds, the last also runs the final norm and the LM head, and those
roles change how many layers a device can hold. Given a chain (the devices in stage order), each
stage gets one layer and the rest go to the fastest stages up to their memory: the latency is
linear in the layer counts, so this fill is exact for the chain. Both searches price chains
here, without the cost model (a few microseconds each); the chosen one is then estimated.
"""

from __future__ import annotations

from galaxy.parallel.sharding import ShardSpec

from .cost import CostModel, weight_bytes
from .profile import activation_bytes, head_flops

ROLES = ("first", "last", "only", "mid")


class Chains:
    """Per-device layer caps by role and per-stage times of one cost model."""

    def __init__(self, cm: CostModel):
        cfg, S, b = cm.cfg, cm.S, cm.b
        self.cm, self.L = cm, cfg.n_layers
        full_h, full_c, full_v = (0, cfg.n_heads), (0, cfg.ffn), (0, cfg.vocab_size)
        self.per_layer = weight_bytes(cfg, ShardSpec(full_h, full_c, full_v, (0, 1), embed=False, head=False), b)
        self.role_bytes = {role: weight_bytes(cfg, ShardSpec(full_h, full_c, full_v, (0, 0), embed=e, head=h), b)
                           for role, e, h in (("first", True, False), ("last", False, True), ("only", True, True),
                                              ("mid", False, False))}
        act = activation_bytes(cfg, S, cfg.n_heads, cfg.ffn, S, b)
        act_last = max(act, cm.head_activation(cfg.vocab_size))
        self.t_layer = [cm.full_layer_s(i) for i in range(cm.n)]
        self.t_first = [cm.con_s(i, S) for i in range(cm.n)]
        self.t_last = [(cm.con_s(i, S) + cm.head_model(i).seconds(head_flops(cfg, cfg.vocab_size, 1)))
                       if cfg.causal else 0.0 for i in range(cm.n)]
        self.hand = S * cfg.hidden * b  # bytes handed from one stage to the next

        def cap(i, role):
            a = act_last if role in ("last", "only") else act
            return int((cm.devices[i].memory_bytes - a - self.role_bytes[role]) // self.per_layer)

        self.caps = {role: [cap(i, role) for i in range(cm.n)] for role in self.role_bytes}

    def price(self, seq) -> tuple[float, list[int]] | None:
        """(latency, layers per stage) of the chain `seq`, or None if it cannot hold the model."""
        cm, caps, L, m = self.cm, self.caps, self.L, len(seq)
        if m == 1:
            c = [caps["only"][seq[0]]]
        else:
            c = [caps["first"][seq[0]], *(caps["mid"][i] for i in seq[1:-1]), caps["last"][seq[-1]]]
        if min(c) < 1 or sum(c) < L:
            return None
        if any(not cm.has_link(seq[r], seq[r + 1]) for r in range(m - 1)):
            return None
        layers = [1] * m
        left = L - m
        if left < 0:
            return None
        for r in sorted(range(m), key=lambda r: self.t_layer[seq[r]]):  # the rest to the fastest stages
            extra = min(left, c[r] - 1)
            layers[r] += extra
            left -= extra
        lat = sum(n * self.t_layer[i] for n, i in zip(layers, seq)) + self.t_first[seq[0]] + self.t_last[seq[-1]]
        lat += sum(cm.link(seq[r], seq[r + 1])[0] * self.hand + cm.link(seq[r], seq[r + 1])[1] for r in range(m - 1))
        return lat, layers
