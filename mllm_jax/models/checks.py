"""Value checks for the model families' `check` hooks (see `registry`). Each works on a
config section or a plain dict of its fields (an HF config before it is mapped) and raises
`InvalidConfigError` naming `where` (e.g. a config.json path and section), the field and the
bad value."""
import math

from mllm_jax.models.registry import InvalidConfigError

# The deepest published checkpoints have about 128 decoder layers (Llama 3.1 405B: 126) and
# 48 encoder layers (ViT-22B). A checkpoint's layers are traced and mapped one at a time
# before its tensors are compared with the config, so a damaged count such as 200000 would
# grow memory for minutes before any tensor is looked at; 1024 leaves eightfold headroom.
MAX_LAYERS = 1024

_FIX = "the config is damaged or was edited; restore it"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def positive_int(section, name: str, where: str, maximum: int | None = None,
                 why: str = "") -> int:
    value = section[name]
    if not _is_int(value) or value < 1:
        raise InvalidConfigError(f"{where}: {name} = {value!r} must be a positive integer; "
                                 f"{_FIX}")
    if maximum is not None and value > maximum:
        raise InvalidConfigError(f"{where}: {name} = {value!r} is more than {maximum}{why}; "
                                 f"{_FIX}")
    return value


def optional_positive_int(section, name: str, where: str) -> None:
    if section.get(name) is not None:
        positive_int(section, name, where)


def token_id(section, name: str, where: str, optional: bool = True) -> None:
    """A non-negative integer (or, when optional, None)."""
    value = section.get(name)
    if (value is None and not optional) or (value is not None and (not _is_int(value)
                                                                   or value < 0)):
        raise InvalidConfigError(f"{where}: {name} = {value!r} must be a token id (an integer "
                                 f">= 0){' or null' if optional else ''}; {_FIX}")


def layer_count(section, name: str, where: str) -> int:
    return positive_int(section, name, where, MAX_LAYERS,
                        " (the deepest published models have about 128 layers)")


def positive_number(section, name: str, where: str) -> float:
    value = section[name]
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise InvalidConfigError(f"{where}: {name} = {value!r} must be a positive number; "
                                 f"{_FIX}")
    return value


def divides(section, small: str, big: str, where: str) -> None:
    """`section[small]` divides `section[big]` (both already checked positive ints)."""
    if section[big] % section[small]:
        raise InvalidConfigError(f"{where}: {small} = {section[small]} does not divide "
                                 f"{big} = {section[big]}; {_FIX}")


def one_of(section, name: str, where: str, allowed) -> None:
    value = section[name]
    if value not in allowed:
        raise InvalidConfigError(f"{where}: {name} = {value!r} must be one of "
                                 f"{', '.join(map(repr, allowed))}; {_FIX}")
