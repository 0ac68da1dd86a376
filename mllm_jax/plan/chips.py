"""TPU chips: HBM, bf16 peak and inter-chip interconnect bandwidth, as Google publishes
them (per chip; GB = 1e9 bytes), for the plan's memory check and roofline.

`ici_bytes_per_s` is what a chip can send per second over all its ICI links in one
direction: half the published bidirectional figure. The ICI floor of a step divides the
bytes each chip sends in its collectives by it: no collective finishes faster.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kind: str  # jax's Device.device_kind
    hbm_bytes: float
    bf16_flops: float  # peak, dense
    ici_bytes_per_s: float  # one direction, all links together
    hbm_bytes_per_s: float
    source: str


CHIPS = {
    "v5e": Chip("v5e", "TPU v5 lite", 16e9, 197e12, 400e9 / 2, 819e9,
                "https://cloud.google.com/tpu/docs/v5e (16 GB HBM at 819 GBps, 197 TFLOPs "
                "bf16, 400 GBps bidirectional ICI per chip)"),
    "v5p": Chip("v5p", "TPU v5", 95e9, 459e12, 4800e9 / 8, 2765e9,
                "https://cloud.google.com/tpu/docs/v5p (95 GB HBM at 2765 GBps, 459 TFLOPs "
                "bf16, 4800 Gbps ICI per chip)"),
    "v6e": Chip("v6e", "TPU v6 lite", 32e9, 918e12, 800e9 / 2, 1638e9,
                "https://cloud.google.com/tpu/docs/v6e (32 GB HBM at 1638 GBps, 918 TFLOPs "
                "bf16, 800 GBps bidirectional ICI per chip)"),
}


def chip_for(topology: str, device_kind: str = "") -> Chip:
    """The chip of a topology name ("v5e:16x16") or of a device kind ("TPU v5 lite")."""
    key = topology.split(":")[0].split("-")[0].lower()
    key = {"v5litepod": "v5e", "v5lite": "v5e"}.get(key, key)
    if key in CHIPS:
        return CHIPS[key]
    for chip in CHIPS.values():
        if chip.device_kind == device_kind:
            return chip
    raise ValueError(f"topology {topology!r}: no chip facts for it (known: "
                     f"{', '.join(CHIPS)}); name it as <chip>:<shape>, e.g. v5e:16x16")
