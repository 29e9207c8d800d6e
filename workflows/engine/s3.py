"""S3's conditional writes, for the store's locks on an s3:// store.

A lock is created with `If-None-Match: *` (exactly one of two racing creators gets it), refreshed and
released with `If-Match` on the ETag its holder last wrote (a holder whose lock was broken learns it on its
next refresh), and a stale lock is taken over by an overwrite with `If-Match` on the ETag the breaker read
(of two breakers, one wins). Whether a server enforces these headers is probed once per endpoint and bucket;
`ConditionalS3.open` returns None for one that does not, and the store falls back to best effort.

boto3 (AWS's own SDK) is imported here only, and only for an s3:// store. Endpoint, region and credentials
come from the standard AWS settings (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`, `~/.aws`), as pyarrow's S3 filesystem takes them; `endpoint_override`, `scheme` and
`region` in the store URI's query, which pyarrow understands, are honoured too.
"""

from __future__ import annotations

import email.utils
import os
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

_LOST = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409"}
_GUARD = threading.Lock()
_CLIENTS: dict[tuple, object] = {}
_SUPPORTED: dict[tuple, bool] = {}


@dataclass
class LockObject:
    body: bytes
    etag: str
    age_s: float  # by the server's clock: its Date header minus the object's LastModified


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code if code in _LOST else status if status in _LOST else code


def _client(uri: str):
    try:
        import boto3
    except ImportError:
        from interpflow.workflows.engine.store import StoreError

        raise StoreError(f"the store '{uri}' is on S3, whose locks need boto3: pip install boto3 "
                         "(or interpflow[s3])") from None
    query = {k: v[-1] for k, v in parse_qs(urlparse(uri).query).items()}
    kwargs = {}
    if query.get("endpoint_override"):
        endpoint = query["endpoint_override"]
        kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"{query.get('scheme', 'https')}://{endpoint}"
    if query.get("region"):
        kwargs["region_name"] = query["region"]
    settings = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_DEFAULT_REGION")
    key = (os.getpid(), tuple(sorted(kwargs.items())), tuple(os.environ.get(name) for name in settings))
    with _GUARD:  # boto3's default session is not thread-safe; its clients are
        if key not in _CLIENTS:
            _CLIENTS[key] = boto3.client("s3", **kwargs)
        return _CLIENTS[key]


class ConditionalS3:
    """Conditional requests on one bucket; paths are pyarrow's `bucket/key` form."""

    def __init__(self, client, bucket: str):
        self.client, self.bucket = client, bucket

    @classmethod
    def open(cls, uri: str, probe_path: str) -> "ConditionalS3 | None":
        """The bucket's conditional requests, or None where the server does not enforce them."""
        client = _client(uri)
        bucket = probe_path.split("/", 1)[0]
        key = (client.meta.endpoint_url, bucket)
        with _GUARD:
            supported = _SUPPORTED.get(key)
        s3 = cls(client, bucket)
        if supported is None:
            supported = s3._probe(f"{probe_path}-{uuid.uuid4().hex}")
            with _GUARD:
                _SUPPORTED[key] = supported
        return s3 if supported else None

    def _key(self, path: str) -> str:
        bucket, key = path.split("/", 1)
        assert bucket == self.bucket, (path, self.bucket)
        return key

    def _probe(self, path: str) -> bool:
        """Does the server refuse a second create of one key? (Servers that ignore the header accept it.)"""
        from botocore.exceptions import ClientError

        try:
            first = self.create(path, b"probe")
            second = self.create(path, b"probe again") if first is not None else "unsupported"
        except ClientError:  # NotImplemented, an unknown header refused, ...: no conditional writes here
            second = "unsupported"
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(path))
        except ClientError:
            pass
        return second is None

    def create(self, path: str, body: bytes) -> str | None:
        """Write `path` if no object is there; its ETag, or None if one was."""
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=body, IfNoneMatch="*")["ETag"]
        except ClientError as exc:
            if _code(exc) in _LOST:
                return None
            raise

    def read(self, path: str) -> LockObject | None:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
        except ClientError as exc:
            if _code(exc) in _LOST:
                return None
            raise
        body = got["Body"].read()
        date = got.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        return LockObject(body, got["ETag"], now - got["LastModified"].timestamp())

    def replace(self, path: str, body: bytes, etag: str) -> str | None:
        """Overwrite `path` if its ETag is still `etag`; the new ETag, or None if it changed or went."""
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=body, IfMatch=etag)["ETag"]
        except ClientError as exc:
            if _code(exc) in _LOST:
                return None
            raise

    def delete(self, path: str, etag: str) -> bool:
        """Delete `path` if its ETag is still `etag`."""
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(path), IfMatch=etag)
            return True
        except ClientError as exc:
            if _code(exc) in _LOST:
                return False
            raise
