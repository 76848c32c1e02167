"""The on-disk activation store: one safetensors shard per batch plus a JSON manifest.

Shards are written to a temporary file and renamed into place, so a killed extraction
never leaves a half-written shard under its final name; ``extract(..., resume=True)``
recomputes only the shards that are missing. Reading is memory-mapped shard by shard, so
analyses can stream runs far larger than RAM (``iter_shards``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from posprobe.finite import check_finite
from posprobe.sites import SiteKey

log = logging.getLogger(__name__)

FORMAT = "posprobe-store/1"
MANIFEST = "manifest.json"
TOKENS_FILE = "tokens.safetensors"


class StoreError(RuntimeError):
    """A store folder that cannot be used as asked (another run, a corrupt shard, a missing site)."""


@dataclass
class Shard:
    """One batch of a store: rows ``start:stop`` of the run, with their tokens and activations."""

    index: int
    start: int
    stop: int
    tokens: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    acts: dict[SiteKey, Tensor]

    def __getitem__(self, key: SiteKey | str) -> Tensor:
        return self.acts[SiteKey.parse(key) if isinstance(key, str) else key]


class ActivationStore:
    """A finished (or resumable) extraction run on disk.

    ``store.get("resid_post", 3)`` returns [n_seq seq ...] for one site and layer;
    ``store.iter_shards(keys)`` streams batches; ``store.token_table()`` is the tidy
    per-token table (seq, position, token_id, token, is_bos).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            raise StoreError(f"{self.path} is not a posprobe store (no {MANIFEST})")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{self.path}: unknown store format {self.manifest.get('format')!r}; expected {FORMAT!r}")
        with safe_open(self.path / TOKENS_FILE, framework="pt") as f:
            self.tokens: Tensor = f.get_tensor("tokens")
            self.attention_mask: Tensor = f.get_tensor("attention_mask")
            self.position_ids: Tensor = f.get_tensor("position_ids")

    # -- description -----------------------------------------------------------------------
    @property
    def keys(self) -> list[SiteKey]:
        return [SiteKey.parse(k) for k in self.manifest["keys"]]

    @property
    def sites(self) -> list[str]:
        return list(dict.fromkeys(k.site for k in self.keys))

    def layers(self, site: str) -> list[int | None]:
        """The layers stored for ``site``."""
        layers = [k.layer for k in self.keys if k.site == site]
        if not layers:
            raise StoreError(f"site {site!r} is not in this store; stored sites: {', '.join(self.sites)}")
        return layers

    @property
    def model_info(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def prepend_bos(self) -> bool:
        return bool(self.manifest["prepend_bos"])

    @property
    def n_seq(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete")) and not self.missing_shards()

    def shard_path(self, index: int) -> Path:
        return self.path / f"shard_{index:05d}.safetensors"

    def shard_bounds(self) -> list[tuple[int, int]]:
        bs = self.manifest["batch_size"]
        return [(s, min(s + bs, self.n_seq)) for s in range(0, self.n_seq, bs)]

    def missing_shards(self) -> list[int]:
        return [i for i in range(len(self.shard_bounds())) if not self.shard_path(i).exists()]

    def token_table(self) -> pd.DataFrame:
        """One row per real token: seq, position, token_id, token (when recorded), is_bos."""
        mask = self.attention_mask.bool()
        seq, col = torch.nonzero(mask, as_tuple=True)
        pos = self.position_ids[seq, col]
        table = pd.DataFrame({"seq": seq.numpy(), "position": pos.numpy(), "token_id": self.tokens[seq, col].numpy()})
        str_tokens = self.manifest.get("str_tokens")
        if str_tokens is not None:
            table["token"] = [str_tokens[s][c] for s, c in zip(seq.tolist(), col.tolist(), strict=True)]
        table["is_bos"] = (table["position"] == 0) & self.prepend_bos
        return table

    # -- reading ---------------------------------------------------------------------------
    def _check_keys(self, keys: Iterable[SiteKey | str]) -> list[SiteKey]:
        out = []
        stored = set(self.keys)
        for key in keys:
            key = SiteKey.parse(key) if isinstance(key, str) else key
            if key not in stored:
                raise StoreError(f"{key.name!r} is not in this store; stored: {', '.join(k.name for k in self.keys)}")
            out.append(key)
        return out

    def iter_shards(
        self, keys: Iterable[SiteKey | str] | None = None, indices: Iterable[int] | None = None
    ) -> Iterator[Shard]:
        """Stream the run batch by batch, reading only ``keys`` (default all) from each shard (``indices``:
        only those shards, e.g. one rank's share of a distributed run)."""
        wanted = None if indices is None else set(indices)
        keys = self.keys if keys is None else self._check_keys(keys)
        missing = self.missing_shards()
        if missing:
            raise StoreError(
                f"{self.path} is incomplete: shards {missing[:5]}{'…' if len(missing) > 5 else ''} are missing; "
                "rerun extract(..., resume=True)"
            )
        for index, (start, stop) in enumerate(self.shard_bounds()):
            if wanted is not None and index not in wanted:
                continue
            path = self.shard_path(index)
            try:
                with safe_open(path, framework="pt") as f:
                    acts = {k: f.get_tensor(k.name) for k in keys}
            except Exception as err:  # safetensors raises several types for damaged files
                raise StoreError(
                    f"shard {path} is corrupt ({err}); delete it and rerun extract(..., resume=True)"
                ) from err
            for key, x in acts.items():
                check_finite(key.site, key.layer, x, start=start, where=f"read from shard {path}")
            yield Shard(
                index,
                start,
                stop,
                self.tokens[start:stop],
                self.attention_mask[start:stop],
                self.position_ids[start:stop],
                acts,
            )

    def get(self, site: str, layer: int | None = None) -> Tensor:
        """All rows of one site and layer: [n_seq seq ...] (padding rows included; see ``attention_mask``)."""
        key = SiteKey(site, layer)
        self._check_keys([key])
        return torch.cat([shard.acts[key] for shard in self.iter_shards([key])])

    def stack(
        self, site: str, layers: Iterable[int | None] | None = None, sequences: Sequence[int] | None = None
    ) -> Tensor:
        """One site over several layers: [n_layers n_seq seq ...]; ``sequences`` (ascending): only those rows,
        read from the shards that hold them (one rank's share of a distributed run)."""
        layers = self.layers(site) if layers is None else list(layers)
        keys = self._check_keys([SiteKey(site, layer) for layer in layers])
        if sequences is None:
            parts = [torch.stack([shard.acts[k] for k in keys]) for shard in self.iter_shards(keys)]
            return torch.cat(parts, dim=1)
        wanted = torch.as_tensor(list(sequences), dtype=torch.long)
        ascending = bool((wanted[1:] > wanted[:-1]).all())
        if not len(wanted) or not ascending or int(wanted[0]) < 0 or int(wanted[-1]) >= self.n_seq:
            raise ValueError(f"sequences must be ascending indices below {self.n_seq}, got {wanted.tolist()[:10]}")
        held = [i for i, (a, b) in enumerate(self.shard_bounds()) if bool(((wanted >= a) & (wanted < b)).any())]
        parts = []
        for shard in self.iter_shards(keys, indices=held):
            rows = wanted[(wanted >= shard.start) & (wanted < shard.stop)] - shard.start
            parts.append(torch.stack([shard.acts[k][rows] for k in keys]))
        return torch.cat(parts, dim=1)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        size = f"{self.n_seq}×{self.seq_len}"
        return f"<ActivationStore {self.path} {self.model_name} {size} {len(self.keys)} keys, {state}>"


def open_store(path: str | os.PathLike[str]) -> ActivationStore:
    """Open a store written by ``pp.extract``."""
    return ActivationStore(path)


# -- writing ---------------------------------------------------------------------------------


def prepare_store(
    path: str | os.PathLike[str],
    manifest: dict[str, Any],
    tokens: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    *,
    resume: bool,
    overwrite: bool,
    bytes_needed: int,
) -> ActivationStore:
    """Create (or reopen for resuming) a store folder for a run described by ``manifest``.

    Refuses to write into a folder that holds another run unless ``overwrite``; on resume,
    the run's identity (model, tokens, keys, batch size, dtype) must match exactly.
    """
    path = Path(path)
    # compare as JSON sees it: tuples become lists on disk
    manifest = json.loads(json.dumps({"format": FORMAT, **manifest, "complete": False}, default=str))
    if (path / MANIFEST).exists():
        reopened = _reopen(path, manifest, resume=resume, overwrite=overwrite)
        if reopened is not None:
            return reopened
        shutil.rmtree(path)
    elif path.exists() and any(path.iterdir()):
        if not overwrite:
            raise StoreError(
                f"{path} exists and is not an empty posprobe store; choose another folder or pass overwrite=True"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    log.info("store %s needs about %.1f MB (%.1f GB free)", path, bytes_needed / 1e6, free / 1e9)
    if bytes_needed > free:
        raise StoreError(f"the run needs {bytes_needed / 1e9:.2f} GB but {path} has only {free / 1e9:.2f} GB free")
    _atomic_save(
        {
            "tokens": tokens.contiguous(),
            "attention_mask": attention_mask.contiguous(),
            "position_ids": position_ids.contiguous(),
        },
        path / TOKENS_FILE,
    )
    _atomic_write_json(manifest, path / MANIFEST)
    return ActivationStore(path)


def _reopen(path: Path, manifest: dict[str, Any], *, resume: bool, overwrite: bool) -> ActivationStore | None:
    """The store already at ``path`` when it holds this run (finished, or to resume); None when ``overwrite``
    lets it go; a StoreError saying what to pass otherwise."""
    old = json.loads((path / MANIFEST).read_text())
    same = all(old.get(k) == manifest.get(k) for k in IDENTITY_FIELDS)
    if same and old.get("complete") and not overwrite:
        log.warning("%s already holds this exact run (same model, tokens, sites and dtype): reusing it", path)
        return ActivationStore(path)
    if resume and same:
        _drop_temporaries(path)
        _drop_corrupt_shards(path)
        return ActivationStore(path)
    if overwrite:
        return None
    old_name = old.get("model", {}).get("name")
    if same:
        raise StoreError(
            f"{path} holds an unfinished run of this same extraction (model {old_name!r}); pass resume=True "
            "to finish it, overwrite=True to start again, or choose another folder"
        )
    why = [k for k in IDENTITY_FIELDS if old.get(k) != manifest.get(k)]
    resuming = "resume=True continues only the same run; " if resume else ""
    raise StoreError(
        f"{path} holds another run (model {old_name!r}; differs in {', '.join(why)}); {resuming}pass "
        "overwrite=True to replace it, or choose another folder"
    )


IDENTITY_FIELDS = ("model", "keys", "token_hash", "batch_size", "store_dtype", "n_seq", "seq_len")


def write_shard(store: ActivationStore, index: int, acts: dict[SiteKey, Tensor]) -> None:
    """Write one batch's activations atomically (temp file, then rename)."""
    _atomic_save({k.name: v.contiguous() for k, v in acts.items()}, store.shard_path(index))


#: safetensors' names of the dtypes a store holds
SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


class StreamedShard:
    """One shard written tensor by tensor while the forward still runs, then moved into place.

    The shapes are known before the forward, so the safetensors header (an 8-byte little-endian
    size, a JSON table of dtypes, shapes and byte offsets padded to 8 bytes) goes first and each
    activation is written at its offset as soon as it exists, from a writer thread: the disk write
    overlaps the rest of the forward instead of following it. Until ``commit`` the file is a
    ``.tmp`` that resume deletes; ``safe_open`` reads the result like any safetensors file.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype):
        self.path, self.tmp, self.dtype = path, path.with_name(path.name + ".tmp"), dtype
        header: dict[str, Any] = {}
        self.offsets: dict[str, tuple[int, tuple[int, ...]]] = {}
        offset, itemsize = 0, torch.empty((), dtype=dtype).element_size()
        for name, shape in shapes.items():
            size = itemsize * math.prod(shape)
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self.offsets[name] = (offset, tuple(shape))
            offset += size
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        self.base = 8 + len(head)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self.fd, len(head).to_bytes(8, "little") + head)
        os.ftruncate(self.fd, self.base + offset)

    def write(self, name: str, x: Tensor) -> None:
        """Write ``x`` (any device, layout or dtype; converted here) at ``name``'s place in the file."""
        offset, shape = self.offsets[name]
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: activation of shape {tuple(x.shape)}, the shard expects {shape}")
        data = x.detach().to(device="cpu", dtype=self.dtype).contiguous().view(-1).view(torch.uint8).numpy()
        view = memoryview(data)  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only on Python >= 3.12
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.base + offset + done)

    def commit(self) -> None:
        os.close(self.fd)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


def mark_complete(store: ActivationStore) -> None:
    store.manifest["complete"] = True
    _atomic_write_json(store.manifest, store.path / MANIFEST)


def write_store(
    path: str | os.PathLike[str],
    acts: dict[str, Tensor],
    tokens: Tensor,
    attention_mask: Tensor | None = None,
    *,
    model_info: dict[str, Any] | None = None,
    batch_size: int | None = None,
    prepend_bos: bool = False,
    overwrite: bool = False,
) -> ActivationStore:
    """Write in-memory activations ``{"site.layer": [n seq ...]}`` as a store (synthetic data, tests)."""
    from posprobe.models.base import positions_from_mask

    tokens = torch.as_tensor(tokens).long()
    mask = torch.ones_like(tokens) if attention_mask is None else torch.as_tensor(attention_mask).long()
    keys = [SiteKey.parse(k) for k in acts]
    batch_size = batch_size or tokens.shape[0]
    manifest = {
        "model": model_info or {"name": "synthetic"},
        "keys": [k.name for k in keys],
        "token_hash": token_hash(tokens, mask),
        "batch_size": batch_size,
        "store_dtype": str(next(iter(acts.values())).dtype).removeprefix("torch."),
        "n_seq": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "prepend_bos": prepend_bos,
    }
    nbytes = sum(v.numel() * v.element_size() for v in acts.values())
    store = prepare_store(
        path, manifest, tokens, mask, positions_from_mask(mask), resume=False, overwrite=overwrite, bytes_needed=nbytes
    )
    for index, (start, stop) in enumerate(store.shard_bounds()):
        write_shard(store, index, {k: acts[k.name][start:stop] for k in keys})
    mark_complete(store)
    return store


def token_hash(tokens: Tensor, attention_mask: Tensor) -> str:
    import hashlib

    h = hashlib.sha256()
    h.update(tokens.long().numpy().tobytes())
    h.update(attention_mask.long().numpy().tobytes())
    return h.hexdigest()[:16]


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _atomic_write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _drop_temporaries(path: Path) -> None:
    for tmp in path.glob("*.tmp"):
        tmp.unlink()


def _drop_corrupt_shards(path: Path) -> None:
    """On resume, a shard that does not parse is deleted (and so recomputed)."""
    for shard in sorted(path.glob("shard_*.safetensors")):
        try:
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    f.get_slice(key).get_shape()
            expected = _declared_size(shard)
            if shard.stat().st_size != expected:
                raise ValueError(f"size {shard.stat().st_size} != declared {expected}")
        except Exception as err:  # any parse failure means the shard must be recomputed
            log.warning("removing corrupt shard %s (%s); it will be recomputed", shard, err)
            shard.unlink()


def _declared_size(shard: Path) -> int:
    """The byte size a safetensors file declares in its header."""
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + n + end
