"""Compile-time planning for TPU topologies: `train_plan` (the training step), `hlo`
(counting a compiled program), `chips` (the chips' published figures)."""
