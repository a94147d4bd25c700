"""Offline teacher cache: the teacher's top-k next-token log-probabilities, captured once.

Per response token the cache keeps what the sparse losses (:mod:`locakd.losses.sparse`) and
exact LoCa need: the k largest teacher log-probabilities with their token ids, the label
token's log-probability (also when it is outside the top k) and the log of the remaining
(tail) mass, all at the capture temperature.

Layout of a cache folder::

    manifest.json                  identity of the run (teacher, tokenizer, data, template, lengths,
                                   k, temperature, ...), the codec, and once complete the shard list
                                   with checksums and num_tokens
    shards/shard-00000.safetensors examples [0, E) ... written atomically (temp file + rename)
    shards/shard-00000.json        the shard's commit record (examples, tokens, sha256), written after it

A shard is complete when its commit record exists and its checksum matches; an interrupted capture
keeps its complete shards and :class:`TeacherCacheWriter` resumes with the others. Shard ``s`` holds
examples ``[s * E, (s + 1) * E)``; rank ``r`` of ``W`` writer processes writes the shards with
``s % W == r``, so several processes never touch the same file. :meth:`TeacherCacheWriter.finalize`
lists the shards in ``manifest.json`` once every one is there.

``locakd lm-cache-teacher`` (:mod:`locakd.lm.cache_command`) writes one such cache per split of an
LM run (``DIR/train``, ``DIR/valid``); :mod:`locakd.lm.cache.run` computes the run identity a cache
records and is checked against (:func:`open_teacher_cache`) and the sparse teacher of a collated
micro-batch (:func:`teacher_cache_targets`); ``lm-distill`` with ``model.teacher_cache`` trains from it
(:class:`locakd.lm.batch_loss.CachedTeacher`, examples carrying their index through :class:`IndexedExamples`).

Compact rows (:class:`CacheCodec`), one fixed-width bit row per token:

* ids: the k ids sorted by id, Elias-Fano coded (``id = hi * D + lo``: the ``lo`` digits in base D,
  the ``hi`` parts in unary), about ``2 + log2(V / k)`` bits per id; the rank order is recomputed
  from the values when reading;
* values, in id order: ``x = log p_top - log p_i`` (>= 0) quantised on a fixed table of levels
  whose spacing follows what the loss is sensitive to (about 0.03 nat near the top, widening
  with x, relative precision deep in the tail; see :func:`value_levels`). Code 0 is exactly
  the top (ties with the top stay ties, so mis-instruction is read exactly) and the last code is
  probability 0. The tail mass is coded on the same table as ``-log(tail mass)``; the absolute
  scale follows from ``stored mass = 1 - tail``, so no per-row anchor is stored;
* the label token itself is not stored (the run has it): rows whose label is not among the k ids
  have their row index and label code in a small per-shard side table, and a reader given the
  batch's labels checks that every other row does hold its label (a cheap test that the cache
  and the run tokenised the same data).

Digits are packed in mixed radix (groups of digits per 64-bit word), rows padded to whole bytes.
"""

from .codec import DEFAULT_VALUE_LEVELS, CacheCodec, TeacherCacheError, value_levels
from .records import DEFAULT_TOP_K, TokenRecords, teacher_token_records
from .run import (
    SPLITS,
    CachedTeacherTargets,
    IndexedExamples,
    cache_split_dir,
    cached_misinstruction,
    examples_sha256,
    open_teacher_cache,
    run_identity,
    teacher_cache_targets,
    teacher_identity,
)
from .store import (
    FORMAT,
    IDENTITY_FIELDS,
    SparseTeacher,
    TeacherCache,
    TeacherCacheWriter,
    file_sha256,
    json_hash,
    tokenizer_hash,
)

__all__ = [
    "DEFAULT_TOP_K",
    "SPLITS",
    "CachedTeacherTargets",
    "DEFAULT_VALUE_LEVELS",
    "FORMAT",
    "IDENTITY_FIELDS",
    "CacheCodec",
    "IndexedExamples",
    "SparseTeacher",
    "TeacherCache",
    "TeacherCacheError",
    "TeacherCacheWriter",
    "TokenRecords",
    "cache_split_dir",
    "cached_misinstruction",
    "examples_sha256",
    "file_sha256",
    "json_hash",
    "open_teacher_cache",
    "run_identity",
    "teacher_cache_targets",
    "teacher_identity",
    "teacher_token_records",
    "tokenizer_hash",
    "value_levels",
]
