"""PEFT LoRA adapters read safely: untrusted folders in, validated tensors with PEFT's scales out.

An adapter arrives from strangers (a peer, an URL, a user's disk), so nothing in it
is trusted until checked here: pickle files are refused, the safetensors header is
parsed by our own bounded code before the `safetensors` library sees the file, the
config may use only the LoRA features the engine implements, and every tensor's
shape, rank, dtype and values are checked against the base model. The engine only
ever receives an `AdapterWeights` built by `load_adapter`.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import regex
import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 65_536
DEFAULT_MAX_BYTES = 4 << 30
# Patterns from the config are regular expressions from strangers; the `regex` engine
# lets us bound each match in time, so a catastrophic-backtracking pattern is a rejection, not a hang.
_REGEX_TIMEOUT_S = 0.05
_MAX_PATTERN_CHARS = 512

# safetensors dtype name -> (bytes per element, torch dtype). Floating point only: LoRA factors are floats.
SAFETENSORS_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "F64": (8, torch.float64),
}

_KEY_PATTERN = regex.compile(
    r"base_model\.model\.model\.layers\.(\d{1,6})\.(self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)\.weight"
)

# Config fields that describe the LoRA math the engine implements.
_SUPPORTED_FIELDS = {"peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
                     "use_rslora", "exclude_modules", "layers_to_transform", "layers_pattern"}
# Fields that describe provenance, training or initialisation only: they do not change inference.
_INERT_FIELDS = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode", "lora_dropout", "megatron_core", "qalora_group_size", "loftq_config",
                 "eva_config", "corda_config", "lora_ga_config", "runtime_config", "ensure_weight_tying",
                 "init_lora_weights"}
# The trainer's declaration of who owns the adapter and its Datanet shares (issue 20, attack 5; docs/security.md).
# Inside the content address, so nobody can change it without changing the adapterId.
DECLARATION_FIELD = "longtail"
# PEFT features that change inference and that the engine does not implement: each must be off.
_UNSUPPORTED_FEATURES = {
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D-style transposed weights; Llama-family projections are nn.Linear)",
    "bias": "bias other than 'none' (trained bias terms)",
    "use_dora": "DoRA (use_dora=true)",
    "modules_to_save": "modules_to_save (fully fine-tuned extra modules)",
    "megatron_config": "Megatron parallel layers",
    "trainable_token_indices": "trainable token embeddings",
    "velora_config": "VeLoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA",
    "monteclora_config": "MonteCLoRA",
    "layer_replication": "layer replication",
    "lora_bias": "lora_bias=true (a bias on lora_B)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
# init_lora_weights values whose initialisation rewrote the base model's weights (PiSSA, OLoRA, ...):
# such an adapter only works on that modified base, so it is refused until converted to plain LoRA.
_PLAIN_INIT_VALUES = (True, False, "gaussian")


class AdapterRejected(ValueError):
    """An adapter folder failed validation; the message names the file, field or tensor and why."""

    def __init__(self, reason: str, *, path: Path | str | None = None):
        self.reason = reason
        self.path = str(path) if path is not None else None
        super().__init__(f"{path}: {reason}" if path is not None else reason)

    def __reduce__(self):  # keyword-only `path`: pickled as a call that passes it (the engine process's pipe)
        return _rebuild_rejected, (self.reason, self.path)


def _rebuild_rejected(reason: str, path: str | None) -> AdapterRejected:
    return AdapterRejected(reason, path=path)


@dataclass(frozen=True)
class ModuleShapes:
    """The base model's LoRA-targetable projections: layer count and (in_features, out_features) per name."""

    num_layers: int
    shapes: dict[str, tuple[int, int]]  # "q_proj" -> (in_features, out_features)

    @classmethod
    def from_hf_config(cls, config: dict) -> ModuleShapes:
        """Shapes of a Llama/Mistral/Qwen2 layer from its HF `config.json` (GQA and explicit head_dim included)."""
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inter = int(config["intermediate_size"])
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            shapes={
                "q_proj": (hidden, heads * head_dim),
                "k_proj": (hidden, kv_heads * head_dim),
                "v_proj": (hidden, kv_heads * head_dim),
                "o_proj": (heads * head_dim, hidden),
                "gate_proj": (hidden, inter),
                "up_proj": (hidden, inter),
                "down_proj": (inter, hidden),
            },
        )

    @classmethod
    def from_model_dir(cls, model_dir: Path | str) -> ModuleShapes:
        return cls.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))

    def module_keys(self) -> Iterator[tuple[int, str, str]]:
        """(layer, projection, PEFT module key) for every projection of the base, in layer order."""
        for layer in range(self.num_layers):
            for name in PROJECTIONS:
                if name in self.shapes:
                    yield layer, name, f"model.layers.{layer}.{_PARENT[name]}.{name}"


@dataclass(frozen=True)
class LoraModule:
    """One adapted projection: `delta(x) = scale * (x @ lora_a.T) @ lora_b.T`, PEFT's layout and scale."""

    layer: int
    module: str  # q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank]
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, per module via the patterns

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter, ready for the engine: its id, config and modules in (layer, projection) order."""

    adapter_id: str  # 0x-hex keccak256 per docs/interfaces.md
    config: dict
    modules: tuple[LoraModule, ...]
    nbytes: int

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules), default=0)

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(m.module for m in self.modules)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the safetensors header declares it; offsets are absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors header that passed our bounds checks."""

    header_size: int
    data_start: int
    file_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


# ---------------------------------------------------------------- ids


def canonical_config_bytes(config: dict) -> bytes:
    """The config as docs/interfaces.md canonicalises it for the adapterId: sorted keys, compact, UTF-8."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def adapter_id_from_parts(config: dict, weights: Path | bytes) -> str:
    """keccak256(canonical_config || safetensors bytes), streaming a file so big adapters are not read twice."""
    from Crypto.Hash import keccak as keccak_stream

    hasher = keccak_stream.new(digest_bits=256)
    hasher.update(canonical_config_bytes(config))
    if isinstance(weights, bytes | bytearray | memoryview):
        hasher.update(weights)
    else:
        with Path(weights).open("rb") as handle:
            while chunk := handle.read(1 << 22):
                hasher.update(chunk)
    return "0x" + hasher.hexdigest()


def adapter_id_of(path: Path | str) -> str:
    """The adapterId of a PEFT folder (its config is parsed, so whitespace and key order do not matter)."""
    folder = _adapter_folder(Path(path))
    return adapter_id_from_parts(_parse_config_file(folder / CONFIG_NAME), folder / WEIGHTS_NAME)


# ---------------------------------------------------------------- files


def _adapter_folder(path: Path) -> Path:
    """The folder holding the adapter; refuses pickle checkpoints and folders without safetensors."""
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterRejected(_pickle_reason(path.name), path=path)
        if path.name in (WEIGHTS_NAME, CONFIG_NAME):
            path = path.parent
        else:
            raise AdapterRejected(f"expected a PEFT adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME})", path=path)
    if not path.is_dir():
        raise AdapterRejected("no such adapter folder", path=path)
    if not (path / CONFIG_NAME).is_file():
        raise AdapterRejected(f"missing {CONFIG_NAME}", path=path)
    if not (path / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterRejected(_pickle_reason(", ".join(pickles)), path=path)
        raise AdapterRejected(f"missing {WEIGHTS_NAME}", path=path)
    return path


def _pickle_reason(names: str) -> str:
    return (f"refusing pickle checkpoint {names}: loading a pickle runs arbitrary code from the file "
            f"(torch.load unpickles objects), so Longtail accepts only {WEIGHTS_NAME}; convert it with "
            "PEFT's save_pretrained(safe_serialization=True) on a machine you trust")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in JSON")


MAX_JSON_DEPTH = 64


def _json_depth_exceeds(text: str, limit: int) -> bool:
    """True when brackets nest deeper than `limit` outside strings.

    Checked before parsing: the C decoder recurses per level, and with a raised
    recursion limit a nesting bomb overflows the C stack instead of raising.
    """
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _strict_json(raw: bytes, what: str, path: Path | str | None) -> Any:
    """JSON with no duplicate keys, NaN or Infinity; nesting bombs fail as a rejection, not a crash."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AdapterRejected(f"{what} is not valid JSON: {error}", path=path) from None
    if _json_depth_exceeds(text, MAX_JSON_DEPTH):
        raise AdapterRejected(f"{what} is not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels", path=path)
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates,
                          parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise AdapterRejected(f"{what} is not valid JSON: {error}", path=path) from None


# Pseudo-filesystems whose files claim to be regular but whose size lies (/proc/self/pagemap reports 0 bytes and
# reads as much as asked); an adapter file resolving into one is refused before it is read.
_PSEUDO_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def _regular_file(path: Path) -> os.stat_result:
    """The stat of `path` (symlinks followed: HF caches link to blobs) once it is a plain file on a real disk."""
    try:
        resolved = path.resolve(strict=True)
        info = resolved.stat()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise AdapterRejected(f"cannot read {path.name}: {getattr(error, 'strerror', None) or error}",
                              path=path) from None
    if any(resolved.is_relative_to(root) for root in _PSEUDO_ROOTS):
        raise AdapterRejected(f"{path.name} resolves to {resolved}, a pseudo-file, not an adapter file", path=path)
    if not stat.S_ISREG(info.st_mode):
        raise AdapterRejected(f"{path.name} is not a regular file", path=path)
    return info


def read_limited(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file, refusing a bigger one; every OS failure is an AdapterRejected.

    The size is checked on what is read, not only on stat: a file can grow between the two.
    """
    size = _regular_file(path).st_size
    if size > limit:
        raise AdapterRejected(f"{path.name} is {size} bytes, over the {limit}-byte limit", path=path)
    try:
        # O_NONBLOCK: a file swapped for a FIFO after the check must not block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise AdapterRejected(f"{path.name} is not a regular file", path=path)
            data = handle.read(limit + 1)
    except OSError as error:
        raise AdapterRejected(f"cannot read {path.name}: {error.strerror or error}", path=path) from None
    if len(data) > limit:
        raise AdapterRejected(f"{path.name} is over the {limit}-byte limit", path=path)
    return data


def _parse_config_file(config_path: Path) -> dict:
    config = _strict_json(read_limited(config_path, MAX_CONFIG_BYTES), CONFIG_NAME, config_path)
    if not isinstance(config, dict):
        raise AdapterRejected(f"{CONFIG_NAME} must hold a JSON object, found {type(config).__name__}",
                              path=config_path)
    return config


def read_safetensors_header(path: Path | str, max_bytes: int = DEFAULT_MAX_BYTES) -> SafetensorsHeader:
    """Parse and bound-check a safetensors header without the safetensors library.

    Checks: 8-byte little-endian header length within limits and the file, strict JSON,
    whitelisted dtypes, shapes whose byte size equals the declared span, spans inside the
    data region, non-overlapping and covering it exactly (no hidden bytes).
    """
    path = Path(path)
    file_size = _regular_file(path).st_size
    if file_size > max_bytes:
        raise AdapterRejected(f"{path.name} is {file_size} bytes, over the {max_bytes}-byte limit", path=path)
    if file_size < 8:
        raise AdapterRejected(f"{path.name} is truncated: {file_size} bytes, shorter than the 8-byte header length",
                              path=path)
    try:
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > MAX_HEADER_BYTES:
                raise AdapterRejected(f"{path.name} declares a {header_size}-byte header, over the "
                                      f"{MAX_HEADER_BYTES}-byte limit", path=path)
            if 8 + header_size > file_size:
                raise AdapterRejected(f"{path.name} is truncated: header of {header_size} bytes but the file has "
                                      f"{file_size - 8} after the length", path=path)
            raw = handle.read(header_size)
    except (OSError, struct.error) as error:  # unreadable, or shrunk since the stat
        raise AdapterRejected(f"cannot read {path.name}: {error}", path=path) from None
    header = _strict_json(raw, f"{path.name} header", path)
    if not isinstance(header, dict):
        raise AdapterRejected(f"{path.name} header must be a JSON object", path=path)
    data_start = 8 + header_size
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise AdapterRejected(f"{path.name} __metadata__ must map strings to strings", path=path)
    if len(header) > MAX_TENSORS:
        raise AdapterRejected(f"{path.name} declares {len(header)} tensors, over the {MAX_TENSORS} limit", path=path)
    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_entry(path, name, entry, data_start, file_size)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values())
    cursor = data_start
    for begin, end, name in spans:
        if begin < cursor:
            raise AdapterRejected(f"tensor {name!r} overlaps the previous tensor (starts at {begin - data_start}, "
                                  f"previous ends at {cursor - data_start})", path=path)
        if begin > cursor:
            raise AdapterRejected(f"{path.name} has {begin - cursor} unindexed bytes before tensor {name!r}",
                                  path=path)
        cursor = end
    if cursor != file_size:
        raise AdapterRejected(f"{path.name} data region is {file_size - data_start} bytes but tensors cover "
                              f"{cursor - data_start}", path=path)
    return SafetensorsHeader(header_size, data_start, file_size, tensors, dict(metadata))


def _tensor_entry(path: Path, name: str, entry: Any, data_start: int, file_size: int) -> TensorEntry:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise AdapterRejected(f"tensor {name!r} header entry must have exactly dtype, shape, data_offsets",
                              path=path)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise AdapterRejected(f"tensor {name!r} has dtype {dtype!r}; allowed: {sorted(SAFETENSORS_DTYPES)}",
                              path=path)
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
        raise AdapterRejected(f"tensor {name!r} has an invalid shape {shape!r}", path=path)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise AdapterRejected(f"tensor {name!r} has invalid data_offsets {offsets!r}", path=path)
    begin, end = data_start + offsets[0], data_start + offsets[1]
    if begin > end or end > file_size:
        raise AdapterRejected(f"tensor {name!r} data_offsets {offsets} fall outside the "
                              f"{file_size - data_start}-byte data region", path=path)
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype][0]
    if end - begin != expected:
        raise AdapterRejected(f"tensor {name!r} of shape {shape} {dtype} needs {expected} bytes but its span "
                              f"holds {end - begin}", path=path)
    return TensorEntry(name, dtype, tuple(shape), begin, end)


# ---------------------------------------------------------------- config


def _bounded_match(pattern: str, text: str, *, full: bool, path: Path | str | None) -> bool:
    try:
        if full:
            return regex.fullmatch(pattern, text, timeout=_REGEX_TIMEOUT_S) is not None
        return regex.match(pattern, text, timeout=_REGEX_TIMEOUT_S) is not None
    except TimeoutError:
        raise AdapterRejected(f"pattern {pattern!r} takes too long to match (catastrophic backtracking)",
                              path=path) from None
    except regex.error as error:
        raise AdapterRejected(f"pattern {pattern!r} is not a valid regular expression: {error}", path=path) from None


def _pattern_matches(key: str, module_key: str, path: Path | str | None) -> bool:
    """PEFT's `get_pattern_key` test for rank_pattern / alpha_pattern keys."""
    return _bounded_match(rf"(.*\.)?({key})$", module_key, full=False, path=path)


def _targets(config: dict, module_key: str, path: Path | str | None) -> bool:
    """PEFT's `check_target_module_exists` for target_modules and exclude_modules (layers checked apart)."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        if _bounded_match(exclude, module_key, full=True, path=path):
            return False
    elif exclude and (module_key in exclude or any(module_key.endswith(f".{e}") for e in exclude)):
        return False
    target = config["target_modules"]
    if isinstance(target, str):
        return _bounded_match(target, module_key, full=True, path=path)
    return module_key in target or any(module_key.endswith(f".{t}") for t in target)


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _check_string_list(config: dict, field: str, path: Path | str | None, allow_regex: bool) -> None:
    value = config.get(field)
    if value is None:
        return
    if isinstance(value, str):
        if not allow_regex:
            raise AdapterRejected(f"{field} must be a list of names", path=path)
        if len(value) > _MAX_PATTERN_CHARS:
            raise AdapterRejected(f"{field} pattern is {len(value)} characters, over {_MAX_PATTERN_CHARS}", path=path)
        return
    if (not isinstance(value, list) or len(value) > 4096
            or not all(isinstance(v, str) and 0 < len(v) <= _MAX_PATTERN_CHARS for v in value)):
        raise AdapterRejected(f"{field} must be a string pattern or a list of module names", path=path)


def _check_pattern_dict(config: dict, field: str, path: Path | str | None, *, integer: bool, max_rank: int) -> None:
    value = config.get(field)
    if value is None:
        config[field] = {}
        return
    if not isinstance(value, dict) or len(value) > 4096:
        raise AdapterRejected(f"{field} must be an object mapping module patterns to numbers", path=path)
    for key, number in value.items():
        if not key or len(key) > _MAX_PATTERN_CHARS:
            raise AdapterRejected(f"{field} key {key!r} must be 1..{_MAX_PATTERN_CHARS} characters", path=path)
        _check_number(number, f"{field}[{key!r}]", path, integer=integer, max_rank=max_rank)


def _check_number(value: Any, field: str, path: Path | str | None, *, integer: bool, max_rank: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AdapterRejected(f"{field} must be a number, found {value!r}", path=path)
    if integer:
        if not isinstance(value, int) or not 1 <= value <= max_rank:
            raise AdapterRejected(f"{field} = {value!r}: a rank must be an integer in 1..{max_rank} "
                                  "(the configured maximum rank)", path=path)
    elif not math.isfinite(value) or abs(value) > 1e6:
        raise AdapterRejected(f"{field} = {value!r} is not a finite scale factor", path=path)


def validate_config(config: dict, *, max_rank: int = 256, path: Path | str | None = None) -> dict:
    """Check an adapter config against the LoRA features the engine implements; return it with PEFT defaults."""
    config = dict(config)
    if config.get("peft_type") != "LORA":
        raise AdapterRejected(f"peft_type is {config.get('peft_type')!r}; only 'LORA' adapters are served", path=path)
    for field, feature in _UNSUPPORTED_FEATURES.items():
        value = config.get(field)
        if field == "bias":
            if value not in (None, "none"):
                raise AdapterRejected(f"bias = {value!r}: {feature} is not supported", path=path)
        elif not _is_off(value):
            raise AdapterRejected(f"{field} = {value!r}: {feature} is not supported", path=path)
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INIT_VALUES:
        raise AdapterRejected(f"init_lora_weights = {init!r}: that initialisation rewrites the base model's "
                              "weights, so the adapter only fits a modified base; convert it to plain LoRA first",
                              path=path)
    if config.get(DECLARATION_FIELD) is not None:
        parse_declaration(config[DECLARATION_FIELD], path=path)
    known = _SUPPORTED_FIELDS | _INERT_FIELDS | set(_UNSUPPORTED_FEATURES) | {DECLARATION_FIELD}
    for field, value in config.items():
        # A field from a newer PEFT is accepted only while its feature is off (its default).
        if field not in known and not _is_off(value):
            raise AdapterRejected(f"unknown config field {field} = {value!r}: not a LoRA feature Longtail serves",
                                  path=path)
    config.setdefault("r", 8)
    config.setdefault("lora_alpha", 8)
    _check_number(config["r"], "r", path, integer=True, max_rank=max_rank)
    _check_number(config["lora_alpha"], "lora_alpha", path, integer=False, max_rank=max_rank)
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterRejected(f"use_rslora must be true or false, found {config['use_rslora']!r}", path=path)
    if config.get("target_modules") in (None, [], ""):
        raise AdapterRejected("target_modules is missing: name the projections the adapter changes", path=path)
    _check_string_list(config, "target_modules", path, allow_regex=True)
    _check_string_list(config, "exclude_modules", path, allow_regex=True)
    _check_pattern_dict(config, "rank_pattern", path, integer=True, max_rank=max_rank)
    _check_pattern_dict(config, "alpha_pattern", path, integer=False, max_rank=max_rank)
    layers = config.get("layers_to_transform")
    if layers is not None and not (
            (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0)
            or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                 for i in layers))):
        raise AdapterRejected(f"layers_to_transform must be a layer index or a list of them, found {layers!r}",
                              path=path)
    return config


def read_adapter_config(path: Path | str, max_rank: int = 256) -> dict:
    """The folder's `adapter_config.json`, parsed strictly and validated (see `validate_config`)."""
    folder = _adapter_folder(Path(path))
    return validate_config(_parse_config_file(folder / CONFIG_NAME), max_rank=max_rank, path=folder / CONFIG_NAME)


# ---------------------------------------------------------------- the owner's declaration (issue 20, attack 5)

MAX_DECLARED_DATANETS = 64  # the Registry takes any number; 64 lines bound what a hostile config costs to check
_TOTAL_BPS = 10_000
_HEX = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True)
class OwnerDeclaration:
    """`adapter_config.json`'s `longtail` object: the owner (checksummed address) and its Datanet shares.

    `datanets` is ((datanetId lowercase 0x-hex, bps), ...) sorted by id, bps summing to 10000, or empty.
    """

    owner: str
    datanets: tuple[tuple[str, int], ...]

    def to_json(self) -> dict:
        return {"owner": self.owner, "datanets": [[d, bps] for d, bps in self.datanets]}


def _is_hex(value: Any, digits: int) -> bool:
    return (isinstance(value, str) and len(value) == 2 + digits and value[:2] == "0x"
            and all(c in _HEX for c in value[2:]))


def declaration_of(owner: str, datanets) -> OwnerDeclaration:
    """A declaration from an owner address and (datanetId, bps) pairs in any order; validated like a parsed one."""
    from eth_utils import to_checksum_address

    if not _is_hex(owner, 40):
        raise AdapterRejected(f"owner {str(owner)[:64]!r} is not a 20-byte hex address")
    if owner[2:] not in (owner[2:].lower(), owner[2:].upper()) and to_checksum_address(owner) != owner:
        raise AdapterRejected(f"owner {owner} has a wrong EIP-55 checksum (a typo?)")
    shares = sorted((str(d).lower(), int(bps)) for d, bps in datanets)
    return parse_declaration({"owner": to_checksum_address(owner), "datanets": [list(s) for s in shares]})


def parse_declaration(value: Any, *, path: Path | str | None = None) -> OwnerDeclaration:
    """Validate a `longtail` object strictly: exact keys, a checksummed owner, sorted unique Datanets, 10000 bps."""
    from eth_utils import to_checksum_address

    def reject(reason: str):
        return AdapterRejected(f"{DECLARATION_FIELD}: {reason}", path=path)

    if not isinstance(value, dict) or set(value) != {"owner", "datanets"}:
        raise reject("must be an object with exactly the keys owner and datanets")
    owner, lines = value["owner"], value["datanets"]
    # Checksummed (EIP-55) only: a typo in a lowercase address would silently name an account nobody holds.
    if not _is_hex(owner, 40) or to_checksum_address(owner) != owner or int(owner, 16) == 0:
        raise reject(f"owner {str(owner)[:64]!r} is not a non-zero EIP-55 checksummed address")
    if not isinstance(lines, list) or len(lines) > MAX_DECLARED_DATANETS:
        raise reject(f"datanets must be a list of at most {MAX_DECLARED_DATANETS} [datanetId, bps] pairs")
    shares = []
    for line in lines:
        if not (isinstance(line, list) and len(line) == 2 and _is_hex(line[0], 64) and line[0] == line[0].lower()
                and isinstance(line[1], int) and not isinstance(line[1], bool) and 0 < line[1] <= _TOTAL_BPS):
            raise reject(f"datanet line {str(line)[:160]} is not [lowercase 0x datanetId, bps in 1..10000]")
        if int(line[0], 16) == 0:
            raise reject("datanet id 0 names no Datanet")
        shares.append((line[0], line[1]))
    if any(a[0] >= b[0] for a, b in zip(shares, shares[1:], strict=False)):
        raise reject("datanets must be sorted by id with no id twice")
    if shares and sum(bps for _, bps in shares) != _TOTAL_BPS:
        raise reject(f"datanet shares sum to {sum(bps for _, bps in shares)}, not {_TOTAL_BPS}")
    return OwnerDeclaration(owner=owner, datanets=tuple(shares))


def read_declaration(path: Path | str) -> OwnerDeclaration | None:
    """The owner declaration of an adapter folder's config; None when it declares none."""
    folder = _adapter_folder(Path(path))
    config = _parse_config_file(folder / CONFIG_NAME)
    value = config.get(DECLARATION_FIELD)
    return None if value is None else parse_declaration(value, path=folder / CONFIG_NAME)


def write_declaration(path: Path | str, declaration: OwnerDeclaration) -> None:
    """Put the declaration into a folder's `adapter_config.json` (this changes the adapterId: run before hashing)."""
    folder = _adapter_folder(Path(path))
    config = _parse_config_file(folder / CONFIG_NAME)
    config[DECLARATION_FIELD] = declaration.to_json()
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- plan: which modules, which ranks and scales


@dataclass(frozen=True)
class ModulePlan:
    """What the config and header together say about one adapted projection, before any tensor is read."""

    layer: int
    module: str
    key_a: str
    key_b: str
    rank: int
    scale: float


def _unique_pattern_value(patterns: dict, module_key: str, field: str, path: Path | str | None) -> Any:
    """PEFT takes the first matching pattern key; we demand that all matching keys agree.

    The adapterId canonicalises the config with sorted keys, so pattern order must not
    change the meaning: two patterns that match one module with different values are refused.
    """
    values = {patterns[key] for key in patterns if _pattern_matches(key, module_key, path)}
    if len(values) > 1:
        raise AdapterRejected(f"{field} is ambiguous for {module_key}: several patterns match with values "
                              f"{sorted(values)}", path=path)
    return next(iter(values)) if values else None


def plan_modules(config: dict, header: SafetensorsHeader, shapes: ModuleShapes, *,
                 path: Path | str | None = None) -> list[ModulePlan]:
    """Match tensor names, shapes and ranks to the base and the config; compute PEFT's scale per module."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    for name in header.tensors:
        match = _KEY_PATTERN.fullmatch(name)
        if match is None:
            raise AdapterRejected(f"tensor {name!r} is not a LoRA factor of a Llama-family projection "
                                  "(expected base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>.weight)",
                                  path=path)
        layer, parent, module, side = int(match.group(1)), match.group(2), match.group(3), match.group(4)
        if _PARENT[module] != parent:
            raise AdapterRejected(f"tensor {name!r}: {module} lives under {_PARENT[module]}, not {parent}", path=path)
        if layer >= shapes.num_layers:
            raise AdapterRejected(f"tensor {name!r} adapts layer {layer} but the base has {shapes.num_layers} layers",
                                  path=path)
        if module not in shapes.shapes:
            raise AdapterRejected(f"tensor {name!r} adapts {module}, which the base model does not have", path=path)
        found.setdefault((layer, module), {})[side] = name
    if not found:
        raise AdapterRejected("the adapter holds no LoRA tensors", path=path)

    base_keys = list(shapes.module_keys())
    target = config["target_modules"]
    if isinstance(target, list):
        for entry in target:
            if not any(key == entry or key.endswith(f".{entry}") for _, _, key in base_keys):
                raise AdapterRejected(f"target module {entry!r} does not exist in the base model "
                                      f"(its projections: {sorted(shapes.shapes)})", path=path)
    layers = config.get("layers_to_transform")
    allowed_layers = None if layers is None or layers == [] else ({layers} if isinstance(layers, int) else set(layers))

    plans: list[ModulePlan] = []
    for layer, module, module_key in base_keys:
        sides = found.pop((layer, module), None)
        targeted = _targets(config, module_key, path) and (allowed_layers is None or layer in allowed_layers)
        if sides is None:
            continue
        if not targeted:
            raise AdapterRejected(f"the file adapts {module_key}, which the config's target_modules / "
                                  "exclude_modules / layers_to_transform do not select", path=path)
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "A" in sides else "lora_A"
            raise AdapterRejected(f"{module_key} has no {missing} tensor", path=path)
        tensor_a, tensor_b = header.tensors[sides["A"]], header.tensors[sides["B"]]
        in_features, out_features = shapes.shapes[module]
        rank = _unique_pattern_value(config["rank_pattern"], module_key, "rank_pattern", path) or config["r"]
        alpha = _unique_pattern_value(config["alpha_pattern"], module_key, "alpha_pattern", path)
        alpha = config["lora_alpha"] if alpha is None else alpha
        if tensor_a.shape != (rank, in_features):
            raise AdapterRejected(f"tensor {tensor_a.name!r} has shape {list(tensor_a.shape)}, expected "
                                  f"[{rank}, {in_features}] (rank {rank} from the config, in_features of "
                                  f"the base {module})", path=path)
        if tensor_b.shape != (out_features, rank):
            raise AdapterRejected(f"tensor {tensor_b.name!r} has shape {list(tensor_b.shape)}, expected "
                                  f"[{out_features}, {rank}] (out_features of the base {module}, rank {rank})",
                                  path=path)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        plans.append(ModulePlan(layer, module, tensor_a.name, tensor_b.name, rank, float(scale)))
    return plans


# ---------------------------------------------------------------- load


def load_adapter(path: Path | str, shapes: ModuleShapes, max_rank: int = 256, max_bytes: int = DEFAULT_MAX_BYTES,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 adapter_id: str | None = None) -> AdapterWeights:
    """Validate a PEFT folder against the base and return its factors on `device` in `dtype`.

    `adapter_id`, when the caller (the store) already verified it, skips hashing the file again.
    """
    folder = _adapter_folder(Path(path))
    weights_path = folder / WEIGHTS_NAME
    config = read_adapter_config(folder, max_rank=max_rank)
    header = read_safetensors_header(weights_path, max_bytes=max_bytes)
    plans = plan_modules(config, header, shapes, path=weights_path)

    from safetensors import safe_open

    # numpy, not torch, for the per-element work: numpy runs it on this thread alone, while torch would
    # fan out to the intra-op pool the engine's matmuls use (a background load then stalls the batch).
    # bfloat16 has no numpy type: a bf16 engine's factors are rounded from fp32 bits in numpy (`_bf16_bits`), and
    # only bf16 files take the torch path. (A torch conversion on a loader thread gives that thread an OpenMP
    # team of its own; with more OpenMP threads than cores libgomp throttles its spinning, and every parallel
    # region of the engine's step then waits on a futex: 20 -> 32 ms a token on a 2-core CPU.)
    numpy_path = all(header.tensors[k].dtype != "BF16" for p in plans for k in (p.key_a, p.key_b))
    target_numpy = _NUMPY_DTYPES.get(dtype)
    modules: list[LoraModule] = []
    nbytes = 0
    with safe_open(str(weights_path), framework="numpy" if numpy_path else "pt") as handle:
        for plan in plans:
            factors = []
            for key in (plan.key_a, plan.key_b):
                tensor = _checked_tensor(handle.get_tensor(key), key, dtype, target_numpy, weights_path)
                factors.append(tensor.to(device).contiguous())
                nbytes += tensor.numel() * tensor.element_size()
            modules.append(LoraModule(plan.layer, plan.module, factors[0], factors[1], plan.scale))
    if adapter_id is None:
        adapter_id = adapter_id_from_parts(_parse_config_file(folder / CONFIG_NAME), weights_path)
    return AdapterWeights(adapter_id=adapter_id, config=config, modules=tuple(modules), nbytes=nbytes)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def _bf16_bits(value: np.ndarray) -> np.ndarray:
    """Finite values as bf16 bit patterns (uint16), rounded to nearest even from fp32 as torch's `.to` rounds."""
    bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype(np.uint16)


def _checked_tensor(value, key: str, dtype: torch.dtype, target_numpy, path: Path) -> torch.Tensor:
    """Reject non-finite values in the file, and values the conversion to `dtype` would overflow."""
    if isinstance(value, np.ndarray):
        finite = bool(np.isfinite(value).all())
        if finite and dtype == torch.bfloat16:
            bits = _bf16_bits(value)
            if bool((((bits >> np.uint16(7)) & np.uint16(0xFF)) == 0xFF).any()):  # exponent all ones: rounded to inf
                raise AdapterRejected(f"tensor {key!r} holds values that overflow {dtype}", path=path)
            return torch.from_numpy(bits).view(torch.bfloat16)
        if finite and target_numpy is not None:
            converted = value.astype(target_numpy, copy=False)
            if not np.isfinite(converted).all():
                raise AdapterRejected(f"tensor {key!r} holds values that overflow {dtype}", path=path)
            return torch.from_numpy(np.ascontiguousarray(converted))
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    else:
        tensor = value
        finite = bool(torch.isfinite(tensor).all())
    if not finite:
        bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterRejected(f"tensor {key!r} holds {bad} non-finite values (NaN or Inf)", path=path)
    converted = tensor.to(dtype)
    if not bool(torch.isfinite(converted).all()):
        raise AdapterRejected(f"tensor {key!r} holds values that overflow {dtype}", path=path)
    return converted


def validate_adapter(path: Path | str, shapes: ModuleShapes, max_rank: int = 256,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> AdapterWeights:
    """Full validation (values included) on CPU; what an import runs before accepting a folder."""
    return load_adapter(path, shapes, max_rank=max_rank, max_bytes=max_bytes)


# ---------------------------------------------------------------- write


def write_peft_adapter(folder: Path | str, config: dict, factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
                       ) -> Path:
    """Save factors as PEFT does (`adapter_config.json` + `adapter_model.safetensors`); keys (layer, projection)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, module), (lora_a, lora_b) in factors.items():
        prefix = f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = lora_b.contiguous()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


def _random_factor(rng: np.random.Generator, shape: tuple[int, int], std: float, dtype: torch.dtype) -> torch.Tensor:
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    if dtype in _NUMPY_DTYPES:
        return torch.from_numpy(values.astype(_NUMPY_DTYPES[dtype]))
    return torch.from_numpy(values).to(dtype)


def write_random_adapter(folder: Path | str, shapes: ModuleShapes, rank: int, targets: tuple[str, ...], *,
                         alpha: float | None = None, seed: int = 0, std: float = 0.02,
                         dtype: torch.dtype = torch.float32) -> Path:
    """A random plain-LoRA adapter for `shapes`, written straight with safetensors (benchmarks, tests).

    Much faster than building it through PEFT, which needs the base model in memory.
    """
    rng = np.random.default_rng(seed)
    factors = {}
    for layer, module, _ in shapes.module_keys():
        if module in targets:
            in_features, out_features = shapes.shapes[module]
            factors[(layer, module)] = tuple(_random_factor(rng, shape, std, dtype)
                                             for shape in ((rank, in_features), (out_features, rank)))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha if alpha is not None else 2 * rank,
              "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "use_dora": False,
              "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "inference_mode": True}
    return write_peft_adapter(folder, config, factors)
