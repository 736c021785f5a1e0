"""`din-ray export`: a checkpoint as a torch.export program that a plain Python process with
torch alone can load and score requests with (no din_ray, no Ray, no pyarrow).

    din-ray export --checkpoint runs/din --output exported/din
    python exported/din/load.py exported/din request.json       # prints the CTRs

    DIR/
      program.pt2        torch.export.save of the scorer: dense-id batch dict -> CTR (B,)
      schema.json        the checkpoint's schema
      vocab/<table>.json raw id -> dense id, for tables with a vocabulary
      export.json        model name, checkpoint version, request fields, torch version
      load.py            the loader: `load(DIR).score(request_dict) -> [CTR per candidate]`

Why torch.export rather than TorchScript: TorchScript is deprecated in torch 2.x and would need
the model code made scriptable (type annotations on every dict, no **kwargs); torch.export traces
the same `forward` the trainer runs, with the batch dimension dynamic, and `torch.export.load`
reads it back with weights included. The embedding lookup in the program is a plain
`F.embedding` per request key (no id deduplication, which has a data-dependent shape), so the
program is the model on the prepared-data layout: one row per candidate, the user's history
repeated.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch import Tensor, nn
from torch.export import Dim

from din_ray import io as atomic
from din_ray.checkpoint import ID_FILTER, MANIFEST, CheckpointError, load_model
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import CTRModel
from din_ray.schema import OOV_ID, Schema

log = logging.getLogger(__name__)

LOADER = Path(__file__).with_name("export_loader.py")


class ExportedScorer(nn.Module):
    """The model with whole tables as buffers: dense-id batch -> CTR.

    Args (forward):
        batch: feature name -> int64 ids, (B,) for scalar features and (B, L) for behaviour
            features (oldest first, PAD after the last real one).
    Returns: (B,) click probabilities.
    """

    def __init__(self, model: CTRModel, tables: EmbeddingTables) -> None:
        super().__init__()
        self.model = model
        self.names = {t: f"table_{i}" for i, t in enumerate(tables.specs)}
        for table, buffer in self.names.items():
            self.register_buffer(buffer, tables.weight(table).detach().clone())

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        emb = {key: nn.functional.embedding(ids, getattr(self, self.names[table]))
               for key, (table, ids) in self.model.sparse_inputs(batch).items()}
        return torch.sigmoid(self.model(emb, batch))


def example_batch(schema: Schema, rows: int = 4) -> dict[str, Tensor]:
    """A (rows,)-row batch of OOV ids with one real behaviour: export's example input."""
    batch = {}
    for f in schema.features:
        if f.is_sequence:
            ids = torch.zeros(rows, f.max_len, dtype=torch.long)
            ids[:, 0] = OOV_ID
        else:
            ids = torch.full((rows,), OOV_ID, dtype=torch.long)
        batch[f.name] = ids
    return batch


def export_checkpoint(checkpoint: str | Path, output: str | Path, *,
                      overwrite: bool = False) -> Path:
    """Write the export directory (see the module docstring) atomically; returns it."""
    checkpoint, output = Path(checkpoint), Path(output)
    if not (checkpoint / MANIFEST).exists() and (checkpoint / "checkpoint" / MANIFEST).exists():
        checkpoint = checkpoint / "checkpoint"
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (--overwrite)")
    if (checkpoint / ID_FILTER).exists():
        raise CheckpointError(f"{checkpoint}: trained with reg='filter'; exporting its id "
                              "remapping is not supported")
    model, tables, c = load_model(checkpoint)
    schema = c.schema
    hashed = set(schema.extra.get("hashed", {})) | set(schema.extra.get("bins", {}))
    scorer = ExportedScorer(model, tables).eval()
    batch = Dim("batch", min=1, max=1 << 20)
    dynamic = ({f.name: ({0: batch} if not f.is_sequence else {0: batch, 1: Dim.STATIC})
                for f in schema.features},)
    with torch.no_grad():
        program = torch.export.export(scorer, (example_batch(schema),), dynamic_shapes=dynamic)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}-{time.time_ns()}")
    try:
        (tmp / "vocab").mkdir(parents=True)
        torch.export.save(program, tmp / "program.pt2")
        schema.save(tmp / "schema.json")
        for table in schema.tables:
            src = checkpoint / "vocab" / f"{table}.parquet"
            if src.exists():
                t = pq.read_table(src)
                mapping = dict(zip(t.column("raw").to_pylist(), t.column("id").to_pylist(),
                                   strict=True))
                (tmp / "vocab" / f"{table}.json").write_text(json.dumps(mapping))
        info = {"model": c.config.get("model"), "checkpoint": str(checkpoint.resolve()),
                "version": _version(checkpoint), "torch": torch.__version__,
                "encoded_elsewhere": sorted(hashed)}
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.copyfile(LOADER, tmp / "load.py")
        atomic.publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s", checkpoint, output)
    return output


def _version(checkpoint: Path) -> str:
    import hashlib

    return hashlib.sha256((checkpoint / MANIFEST).read_bytes()).hexdigest()[:12]
