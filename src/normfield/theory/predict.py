"""Mean-field predictions (work in progress: the interpreter lands in the next commit)."""

from normfield.arch import Arch


def predict(arch: Arch):
    raise NotImplementedError("theory interpreter not written yet")


def predict_grad_norms(depth: int, placement: str = "pre", **arch_fields):
    return predict(Arch(depth=depth, placement=placement, **arch_fields))


def predict_activations(depth: int, placement: str = "pre", **arch_fields) -> dict:
    return predict(Arch(depth=depth, placement=placement, **arch_fields)).activations
