"""Cache folders: the sharded, resumable writer and the checksum-verifying reader."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...engine.io import atomic_write
from ...errors import InputError
from .codec import DEFAULT_VALUE_LEVELS, CacheCodec, TeacherCacheError
from .records import DEFAULT_TOP_K, IGNORE_INDEX, TokenRecords

FORMAT = "locakd-teacher-cache-v1"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"

# Identity fields a run is checked against (see TeacherCache.check_matches), in the order reported.
IDENTITY_FIELDS = (
    "tokenizer_hash", "data_files", "data_selection", "data_layout", "template", "max_length",
    "max_prompt_length", "temperature", "vocab_size", "top_k", "teacher", "teacher_config_hash",
    "teacher_dtype", "split", "examples_sha256",
)

# --------------------------------------------------------------------------------------------------
# Identity helpers
# --------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_hash(value: Any) -> str:
    """sha256 of a JSON-able value (keys sorted): e.g. a teacher's config dict."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of a Hugging Face tokenizer's full definition (vocabulary, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    return hashlib.sha256((text + json.dumps(special, sort_keys=True)).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def _write_json(path: Path, value: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TeacherCacheError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TeacherCacheError(f"{what} {path} is not valid JSON ({err})") from None


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _locakd_version() -> str:
    from ... import __version__

    return __version__


def _normalise_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """JSON round trip, so a manifest read back compares equal to the identity written."""
    return json.loads(json.dumps(dict(identity), sort_keys=True, default=str))


def _first_difference(cached: Mapping[str, Any], run: Mapping[str, Any], fields: Iterable[str]) -> str | None:
    for name in fields:
        if name in run and cached.get(name) != run[name]:
            return name
    return None


def _describe(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


class TeacherCacheWriter:
    """Writes the shards of one cache (one instance per process; see the module docstring).

    ``identity`` describes the run (what :meth:`TeacherCache.check_matches` compares later):
    e.g. ``teacher``, ``teacher_config_hash``, ``tokenizer_hash``, ``data_files`` ({name: sha256}),
    ``template``, ``max_length``, ``max_prompt_length``, ``teacher_dtype``, ``split``; ``top_k``
    and ``temperature`` are added from the arguments. Opening a folder that already holds a cache
    of another identity is an error naming the first differing field.
    """

    def __init__(self, directory: str | os.PathLike[str], *, identity: Mapping[str, Any], vocab_size: int,
                 num_examples: int, top_k: int = DEFAULT_TOP_K, temperature: float = 1.0,
                 examples_per_shard: int = 256, num_levels: int = DEFAULT_VALUE_LEVELS,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_examples < 1 or examples_per_shard < 1:
            raise InputError(f"num_examples ({num_examples}) and examples_per_shard ({examples_per_shard}) must be >= 1")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in [0, world_size={world_size})")
        self.directory = Path(directory)
        self.codec = CacheCodec(vocab_size, top_k, num_levels)
        self.rank, self.world_size = rank, world_size
        self.num_examples, self.examples_per_shard = num_examples, examples_per_shard
        self.num_shards = -(-num_examples // examples_per_shard)
        self.identity = _normalise_identity({**identity, "top_k": top_k, "temperature": float(temperature)})
        self.header = {
            "format": FORMAT,
            "locakd_version": _locakd_version(),
            "identity": self.identity,
            "codec": self.codec.to_dict(),
            "num_examples": num_examples,
            "examples_per_shard": examples_per_shard,
            "num_shards": self.num_shards,
        }
        self._open()

    def _open(self) -> None:
        path = self.directory / MANIFEST
        if path.is_file():
            existing = _read_json(path, "teacher cache manifest")
            self._check_same_cache(existing)
        else:
            # Every rank may write it: the content is identical, and the write is atomic.
            _write_json(path, {**self.header, "complete": False})
        (self.directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()

    def _check_same_cache(self, existing: Mapping[str, Any]) -> None:
        if existing.get("format") != FORMAT:
            raise TeacherCacheError(f"{self.directory} holds something else than a {FORMAT} cache "
                                    f"(format {existing.get('format')!r})")
        cached_identity = existing.get("identity", {})
        names = list(dict.fromkeys([*IDENTITY_FIELDS, *self.identity, *cached_identity]))
        field = _first_difference(cached_identity, self.identity, names) or _first_difference(
            self.identity, cached_identity, names)
        if field is not None:
            raise TeacherCacheError(
                f"{self.directory} already holds a teacher cache of another run: {field} is "
                f"{_describe(cached_identity.get(field))} there, {_describe(self.identity.get(field))} now; "
                "use another cache folder (or delete this one)"
            )
        for key in ("num_examples", "examples_per_shard", "codec"):
            if existing.get(key) != self.header[key]:
                raise TeacherCacheError(
                    f"{self.directory} already holds a teacher cache with another {key} "
                    f"({_describe(existing.get(key))} there, {_describe(self.header[key])} now)"
                )

    def _remove_stale_temp_files(self) -> None:
        # Temp files of this rank's shards only: other ranks may be writing theirs right now.
        for tmp in (self.directory / SHARD_DIR).glob(".shard-*.tmp"):
            try:
                index = int(tmp.name.split("-")[1].split(".")[0])
            except (IndexError, ValueError):
                continue
            if index % self.world_size == self.rank:
                tmp.unlink(missing_ok=True)

    # ---- shards ---------------------------------------------------------------------------------
    def shard_examples(self, shard: int) -> range:
        """Example indices of ``shard``."""
        return range(shard * self.examples_per_shard, min((shard + 1) * self.examples_per_shard, self.num_examples))

    def is_complete(self, shard: int) -> bool:
        """True when the shard's commit record exists and its file's checksum matches it."""
        name = _shard_name(shard)
        record_path = self.directory / SHARD_DIR / f"{name}.json"
        data_path = self.directory / SHARD_DIR / f"{name}.safetensors"
        if not record_path.is_file() or not data_path.is_file():
            return False
        try:
            record = json.loads(record_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        return record.get("sha256") == file_sha256(data_path)

    def pending_shards(self) -> list[int]:
        """This rank's shards that are not complete yet, in order."""
        return [s for s in range(self.rank, self.num_shards, self.world_size) if not self.is_complete(s)]

    def write_shard(self, shard: int, records: TokenRecords) -> dict[str, Any]:
        """Encode and write one shard atomically (file, then its commit record); returns the record."""
        if not 0 <= shard < self.num_shards:
            raise InputError(f"shard {shard} is not in [0, {self.num_shards})")
        if shard % self.world_size != self.rank:
            raise InputError(f"shard {shard} belongs to rank {shard % self.world_size}, not rank {self.rank}")
        examples = self.shard_examples(shard)
        counts = records.tokens_per_example.cpu().numpy().astype(np.int64)
        if counts.shape[0] != len(examples):
            raise InputError(f"shard {shard} holds examples {examples.start}..{examples.stop - 1} "
                             f"({len(examples)}), the records cover {counts.shape[0]}")
        if int(counts.sum()) != records.num_tokens:
            raise InputError("records: tokens_per_example does not add up to the number of rows")
        from safetensors.numpy import save

        rows, outside_rows, outside_codes = self.codec.encode(records)
        # Mis-instruction from the unquantised records: label log-prob < top-1 (a tie is right).
        misinstructed = int((records.label_logprob < records.topk_logprobs[:, 0]).sum()) if records.num_tokens else 0
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        payload = save(
            {"rows": rows, "example_offsets": offsets, "label_outside_rows": outside_rows.astype(np.uint32),
             "label_outside_codes": outside_codes.astype(np.uint8 if self.codec.num_levels <= 256 else np.uint16)},
            # One metadata key: safetensors writes a map's keys in no fixed order, and shards must be
            # reproducible byte for byte (a resumed capture equals an uninterrupted one).
            metadata={"locakd": json.dumps({"format": FORMAT, "shard": shard,
                                            "examples": [examples.start, examples.stop]}, sort_keys=True)},
        )
        name = _shard_name(shard)
        _atomic_write_bytes(self.directory / SHARD_DIR / f"{name}.safetensors", payload)
        record = {"index": shard, "file": f"{SHARD_DIR}/{name}.safetensors", "examples": [examples.start, examples.stop],
                  "num_tokens": records.num_tokens, "num_misinstructed": misinstructed, "bytes": len(payload),
                  "sha256": hashlib.sha256(payload).hexdigest()}
        _write_json(self.directory / SHARD_DIR / f"{name}.json", record)
        return record

    def finalize(self) -> bool:
        """List every shard in ``manifest.json`` if all are complete (call once, e.g. on rank 0 after a barrier).

        Returns True when the cache is complete. Checksums are verified here, so a complete manifest
        only ever lists shards whose files match.
        """
        shards = []
        for shard in range(self.num_shards):
            if not self.is_complete(shard):
                return False
            shards.append(_read_json(self.directory / SHARD_DIR / f"{_shard_name(shard)}.json", "shard record"))
        manifest = {**self.header, "complete": True, "num_tokens": sum(s["num_tokens"] for s in shards),
                    "num_misinstructed": sum(s["num_misinstructed"] for s in shards),
                    "bytes": sum(s["bytes"] for s in shards), "shards": shards}
        _write_json(self.directory / MANIFEST, manifest)
        return True


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


@dataclass
class SparseTeacher:
    """Decoded cache rows, ready for :func:`locakd.losses.sparse.sparse_token_distill_loss`.

    ``topk_ids`` int64 / ``topk_logprobs`` float32 ``[N, k]`` (largest first), ``label_logprob`` and
    ``tail_logprob`` float32 ``[N]``, ``label_stored`` bool ``[N]`` (the label is among the ids; its
    ``label_logprob`` is then the stored entry's when the labels were given to the reader, ``-inf``
    otherwise: the sparse losses take the stored entry either way), ``tokens_per_example`` ``[B]``.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    label_logprob: torch.Tensor
    tail_logprob: torch.Tensor
    label_stored: torch.Tensor
    tokens_per_example: torch.Tensor


class TeacherCache:
    """Reads a complete cache folder; shards are checksum-verified when first opened."""

    def __init__(self, directory: str | os.PathLike[str], *, max_open_shards: int = 4) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise TeacherCacheError(f"teacher cache folder not found: {self.directory}")
        manifest = _read_json(self.directory / MANIFEST, "teacher cache manifest")
        if manifest.get("format") != FORMAT:
            raise TeacherCacheError(f"{self.directory} is not a {FORMAT} cache (format {manifest.get('format')!r})")
        if not manifest.get("complete"):
            done = sum(1 for _ in (self.directory / SHARD_DIR).glob("shard-*.json"))
            raise TeacherCacheError(
                f"teacher cache {self.directory} is incomplete ({done} of {manifest.get('num_shards')} shards "
                "written); run the capture again with the same settings to resume it"
            )
        self.manifest = manifest
        self.codec = CacheCodec.from_dict(manifest["codec"])
        self.identity: dict[str, Any] = manifest["identity"]
        self.num_examples: int = int(manifest["num_examples"])
        self.examples_per_shard: int = int(manifest["examples_per_shard"])
        self.num_tokens: int = int(manifest["num_tokens"])
        self._shards = {int(s["index"]): s for s in manifest["shards"]}
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._max_open = max(1, max_open_shards)

    @property
    def top_k(self) -> int:
        return self.codec.top_k

    @property
    def temperature(self) -> float:
        return float(self.identity["temperature"])

    @property
    def vocab_size(self) -> int:
        return self.codec.vocab_size

    @property
    def bytes_per_token(self) -> float:
        """Shard bytes (rows, side table, offsets, safetensors header) per cached token."""
        return self.manifest["bytes"] / max(self.num_tokens, 1)

    def misinstruction(self) -> dict[str, Any]:
        """The teacher's token-level mis-instruction rate over the whole cache (counted at capture, exact)."""
        mis, total = int(self.manifest["num_misinstructed"]), self.num_tokens
        return {"misinstruction_rate": mis / max(total, 1), "top1_accuracy": 1.0 - mis / max(total, 1),
                "n_tokens": total, "n_misinstructed": mis, "n_examples": self.num_examples}

    def check_matches(self, run_identity: Mapping[str, Any]) -> None:
        """Raise :class:`TeacherCacheError` naming the first field where the run differs from the cache.

        Only the fields present in ``run_identity`` are compared (e.g. ``tokenizer_hash``,
        ``data_files``, ``template``, ``max_length``, ``max_prompt_length``, ``temperature``, ``top_k``).
        """
        run = _normalise_identity(run_identity)
        for name in dict.fromkeys([*IDENTITY_FIELDS, *run]):
            if name not in run:
                continue
            if name not in self.identity:
                raise TeacherCacheError(f"the teacher cache {self.directory} does not record {name!r}; "
                                        "capture it again with this locakd")
            if self.identity[name] != run[name]:
                raise TeacherCacheError(
                    f"the teacher cache {self.directory} does not match this run: {name} is "
                    f"{_describe(self.identity[name])} in the cache, {_describe(run[name])} in the run"
                )

    # ---- shards ---------------------------------------------------------------------------------
    def _shard(self, index: int) -> dict[str, np.ndarray]:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        record = self._shards.get(index)
        if record is None:
            raise TeacherCacheError(f"teacher cache {self.directory}: shard {index} is not listed in the manifest")
        path = self.directory / record["file"]
        try:
            payload = path.read_bytes()
        except FileNotFoundError:
            raise TeacherCacheError(f"teacher cache shard missing: {path}") from None
        if hashlib.sha256(payload).hexdigest() != record["sha256"]:
            raise TeacherCacheError(f"teacher cache shard {path} does not match its checksum (corrupt or replaced)")
        from safetensors.numpy import load

        arrays = load(payload)
        self._open[index] = arrays
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return arrays

    def read(self, example_indices: Sequence[int], labels: torch.Tensor | None = None) -> SparseTeacher:
        """The rows of the given examples (in the given order), decoded.

        ``labels`` (optional, ``[N]``: the label ids of the returned rows, in order) fills the
        ``label_logprob`` of rows whose label is stored and checks the cache against them: a row
        without a side-table entry must hold its label, a row with one must not.
        """
        indices = [int(i) for i in example_indices]
        for i in indices:
            if not 0 <= i < self.num_examples:
                raise InputError(f"example index {i} is out of range for a cache of {self.num_examples} examples")
        row_parts, outside_parts, code_parts, counts = [], [], [], []
        for i in indices:
            shard, local = divmod(i, self.examples_per_shard)
            arrays = self._shard(shard)
            start, stop = (int(x) for x in arrays["example_offsets"][local:local + 2])
            row_parts.append(arrays["rows"][start:stop])
            outside_rows = arrays["label_outside_rows"].astype(np.int64)
            lo, hi = np.searchsorted(outside_rows, [start, stop])
            outside = np.zeros(stop - start, dtype=bool)
            codes = np.zeros(stop - start, dtype=np.int64)
            outside[outside_rows[lo:hi] - start] = True
            codes[outside_rows[lo:hi] - start] = arrays["label_outside_codes"][lo:hi]
            outside_parts.append(outside)
            code_parts.append(codes)
            counts.append(stop - start)
        width = self.codec.row_bytes
        rows = np.concatenate(row_parts) if row_parts else np.zeros((0, width), np.uint8)
        outside = np.concatenate(outside_parts) if outside_parts else np.zeros(0, bool)
        codes = np.concatenate(code_parts) if code_parts else np.zeros(0, np.int64)
        decoded = self.codec.decode(rows, outside, codes)
        teacher = SparseTeacher(
            topk_ids=torch.from_numpy(decoded["topk_ids"]),
            topk_logprobs=torch.from_numpy(decoded["topk_logprobs"]),
            label_logprob=torch.from_numpy(decoded["label_logprob"]),
            tail_logprob=torch.from_numpy(decoded["tail_logprob"]),
            label_stored=torch.from_numpy(~outside),
            tokens_per_example=torch.tensor(counts, dtype=torch.int64),
        )
        if labels is not None:
            self._attach_labels(teacher, indices, labels)
        return teacher

    def _attach_labels(self, teacher: SparseTeacher, indices: Sequence[int], labels: torch.Tensor) -> None:
        labels = labels.reshape(-1).cpu().to(torch.int64)
        if labels.shape[0] != teacher.topk_ids.shape[0]:
            raise InputError(f"labels hold {labels.shape[0]} tokens, the cached examples {teacher.topk_ids.shape[0]}")
        hit = teacher.topk_ids == labels.unsqueeze(1)
        found = hit.any(dim=1)
        wrong = found != teacher.label_stored
        if bool(wrong.any()):
            position = int(wrong.nonzero()[0, 0])
            example = indices[int(torch.searchsorted(teacher.tokens_per_example.cumsum(0), position, right=True))]
            raise TeacherCacheError(
                f"example {example}: the teacher cache's rows do not match the batch's labels (the cache was "
                "captured from other data or with another tokenizer)"
            )
        stored_value = teacher.topk_logprobs.gather(1, hit.to(torch.int8).argmax(dim=1, keepdim=True)).squeeze(1)
        teacher.label_logprob = torch.where(found, stored_value, teacher.label_logprob)

    def batch_targets(self, example_indices: Sequence[int], labels: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
        """Teacher tensors aligned with a batch: ``[B, L, k]`` / ``[B, L]`` where ``labels [B, L]`` is not ignored.

        ``labels`` are the batch's *aligned* labels (after the next-token shift), one row per example
        of ``example_indices``. Checks that every example has as many response tokens as the cache
        and that the cached rows fit the labels (else a :class:`TeacherCacheError`: the cache was made
        from other data or another tokenisation). Returns ``topk_ids``, ``topk_logprobs``,
        ``label_logprob``, ``tail_logprob`` on ``labels.device``; ignored positions hold zeros.
        """
        if labels.dim() != 2 or labels.shape[0] != len(example_indices):
            raise InputError(f"labels must be [B, L] with B = {len(example_indices)} examples, got {tuple(labels.shape)}")
        cpu_labels = labels.cpu()
        valid = cpu_labels != ignore_index
        teacher = self.read(example_indices)
        for row, (cached, seen) in enumerate(zip(teacher.tokens_per_example.tolist(), valid.sum(dim=1).tolist(), strict=True)):
            if cached != seen:
                raise TeacherCacheError(
                    f"example {example_indices[row]}: the teacher cache holds {cached} response tokens, the batch "
                    f"{seen} (the cache was captured from other data, template or lengths)"
                )
        self._attach_labels(teacher, list(example_indices), cpu_labels[valid])
        batch, length = labels.shape
        k = self.top_k
        out = {
            "topk_ids": torch.zeros(batch, length, k, dtype=torch.int64),
            "topk_logprobs": torch.zeros(batch, length, k, dtype=torch.float32),
            "label_logprob": torch.zeros(batch, length, dtype=torch.float32),
            "tail_logprob": torch.zeros(batch, length, dtype=torch.float32),
        }
        for name, tensor in out.items():
            tensor[valid] = getattr(teacher, name)
        return {name: tensor.to(labels.device) for name, tensor in out.items()}
