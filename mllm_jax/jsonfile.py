"""Reading a checkpoint's small JSON files (config.json, tokenizer_config.json, indexes) as
untrusted input: a damaged file is an error naming it, not a bare JSONDecodeError."""
import json

from mllm_jax import storage


def read_object(path, fix: str, error=ValueError) -> dict:
    """The JSON object in `path`; raises `error` naming `path` and saying `fix` (what to do)
    when the file is not valid UTF-8 JSON or holds something other than an object."""
    try:
        with storage.open_file(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value
