"""Corpus embedding at scale: a manifest of items -> one LanceDB table of SLQ vectors.

The glue around the library for large corpora: Ray Data runs `SLQEncoder` in an actor pool
(one actor per GPU, or N CPU actors), workers write Lance fragments, and the driver commits them
in chunks, so a killed run resumes where it stopped and no id is ever written twice. Tables and
manifests may live on S3-compatible object storage.

    slq corpus embed corpus.jsonl --checkpoint checkpoints/slq --uri s3://bucket/lancedb

Modules: `manifest` (read and check the input), `storage` (local paths and s3:// URIs),
`writer` (append to a Lance table, one commit per call), `embed` (the two engines: Ray and
in-process). docs/scale.md says how to run it on a cluster. Like the pipeline stages this
package imports MLOps tools (Ray, Lance); the core library never imports it.
"""

from slq.mlops.corpus.errors import CorpusError

__all__ = ["CorpusError"]
