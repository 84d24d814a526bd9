"""Where corpus files live: local paths, or s3:// URIs on AWS or any S3-compatible store.

One representation travels everywhere: Lance's storage options (a dict of strings). The driver
resolves it once (`storage_options`) from params.yaml's `corpus.storage` (endpoint, region: never
secrets) and the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_ENDPOINT_URL, AWS_REGION), and hands it to Lance, to pyarrow (manifests, images on S3) and to
the Ray workers, whose environment on a cluster is not the driver's. Without credentials in the
environment none are passed, and Lance and pyarrow fall back to the usual AWS chain (an instance
role, ~/.aws).
"""

from __future__ import annotations

import os
from pathlib import Path

from slq.mlops.corpus.errors import CorpusError

DEFAULT_REGION = "us-east-1"


def is_remote(uri: str | Path) -> bool:
    """True for an object-store URI (s3://, gs://, az://, ...), False for a local path."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def storage_options(endpoint: str | None = None, region: str | None = None, env=None) -> dict[str, str]:
    """Lance storage options for S3: `endpoint`/`region` from params (None: the environment's),
    credentials only from the environment."""
    env = os.environ if env is None else env
    endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    opts = {"aws_region": region}
    if endpoint:
        opts["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            opts["allow_http"] = "true"
    for key, var in (("aws_access_key_id", "AWS_ACCESS_KEY_ID"), ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                     ("aws_session_token", "AWS_SESSION_TOKEN")):
        if env.get(var):
            opts[key] = env[var]
    return opts


def s3_filesystem(options: dict[str, str]):
    """A pyarrow S3 filesystem with the same endpoint, region and credentials Lance gets."""
    from pyarrow import fs

    kw = {"region": options.get("aws_region", DEFAULT_REGION)}
    endpoint = options.get("aws_endpoint")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if options.get("aws_access_key_id"):
        kw.update(access_key=options["aws_access_key_id"], secret_key=options.get("aws_secret_access_key"),
                  session_token=options.get("aws_session_token"))
    return fs.S3FileSystem(**kw)


def _filesystem(uri: str, options: dict[str, str]):
    """(pyarrow filesystem, path inside it) for a local path or an object-store URI."""
    from pyarrow import fs

    if str(uri).startswith("s3://"):
        return s3_filesystem(options), str(uri)[len("s3://"):]
    if is_remote(uri):
        return fs.FileSystem.from_uri(str(uri))
    return fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def read_bytes(uri: str | Path, options: dict[str, str]) -> bytes:
    """The whole file at a local path or an s3:// URI; a missing one is FileNotFoundError naming it."""
    if not is_remote(uri):
        return Path(uri).read_bytes()
    filesystem, path = _filesystem(str(uri), options)
    try:
        with filesystem.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such object: {uri}") from None
    except OSError as e:
        if "NoSuchKey" in str(e) or "does not exist" in str(e) or "not found" in str(e).lower():
            raise FileNotFoundError(f"no such object: {uri}") from None
        raise CorpusError(f"cannot read {uri}: {e} (check corpus.storage in params.yaml and the AWS_* "
                          "environment variables)") from None


def join(base: str, rel: str) -> str:
    """`rel` taken from the folder or prefix `base` (a local folder or an object-store URI);
    an absolute path or a URI is returned as it is."""
    if is_remote(rel) or Path(rel).is_absolute():
        return rel
    if is_remote(base):
        return base.rstrip("/") + "/" + rel
    return str((Path(base) / rel).resolve())


def parent(uri: str) -> str:
    """The folder (or prefix) holding a file given by path or URI."""
    if is_remote(uri):
        return uri.rsplit("/", 1)[0]
    return str(Path(uri).resolve().parent)


def absolute(uri: str | Path) -> str:
    """A local path made absolute (Ray workers do not share the driver's working folder); a URI as it is."""
    return str(uri) if is_remote(uri) else str(Path(uri).expanduser().resolve())
