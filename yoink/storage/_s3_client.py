"""The S3 client of one S3Storage: opened on first use, and the edge where botocore's errors end.

Every request goes through :meth:`S3Client.call`, which turns botocore's exceptions into yoink's
(or into the two signals the storage acts on: a failed condition, a missing key). Messages name
the journal and what to do, and never a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import aioboto3
import anyio
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from yoink._exceptions import StorageError
from yoink._tasks import asyncio_loop_of
from yoink.storage._uri import redact

__all__ = ["IAM_ACTIONS", "Conflict", "Missing", "S3Client"]

IAM_ACTIONS = (
    "s3:GetObject, s3:PutObject and s3:ListBucket, plus s3:DeleteObject for layout='segments', "
    "s3:AbortMultipartUpload for multipart uploads and s3:ListBucketMultipartUploads to compact"
)
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_BAD_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


class Conflict(Exception):
    """A conditional request failed: the object is not what this writer thought."""


class Missing(Exception):
    """The key does not exist."""


class _AccessDenied(StorageError):
    """S3 said 403; a HEAD's 403 may also be a bad signature, which only other requests tell."""


class S3Client:
    """One aiobotocore client for one bucket, opened lazily and closed by :meth:`close`."""

    def __init__(
        self,
        bucket: str,
        *,
        journal: str,
        endpoint: str | None,
        region: str | None,
        profile: str | None,
        retries: dict[str, Any],
        timeout: float,
    ) -> None:
        self.bucket = bucket
        self.endpoint = endpoint
        self._journal = journal  # what messages call it: its URI
        self._region = region
        self._profile = profile
        self._retries = retries
        self._timeout = timeout
        self._stack: contextlib.AsyncExitStack | None = None
        self._handle: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the client belongs to
        self._lock = anyio.Lock()

    async def call(self, operation: str, **params: Any) -> Any:
        """Run ``operation`` (a client method name) on the bucket."""
        asyncio_loop_of(self, self._loop if self._handle is not None else None)
        client = self._handle or await self._open()
        try:
            with self.translated(operation):
                return await getattr(client, operation)(Bucket=self.bucket, **params)
        except _AccessDenied:
            if operation.startswith("head_"):  # a 403 to a HEAD has no body to say why; ask again
                await self.call("list_objects_v2", MaxKeys=1)
            raise

    async def check_bucket(self) -> None:
        try:
            await self.call("head_bucket")
        except Missing:
            raise self._no_bucket() from None

    def __repr__(self) -> str:
        return f"S3Client({self._journal!r})"

    async def close(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._handle = self._stack, None, None
            if self._loop is not asyncio.get_running_loop():
                return  # its loop is gone, and its connections with it
            with anyio.CancelScope(shield=True):
                await stack.aclose()

    def forget(self) -> None:
        """Drop the client without closing it: it belongs to a parent process, or a dead loop."""
        self._stack = self._handle = None

    async def _open(self) -> Any:
        async with self._lock:
            if self._handle is None:
                stack = contextlib.AsyncExitStack()
                session = aioboto3.Session(profile_name=self._profile)
                config = AioConfig(
                    retries=self._retries, connect_timeout=self._timeout, read_timeout=self._timeout
                )
                client = session.client(
                    "s3", endpoint_url=self.endpoint, region_name=self._region, config=config
                )
                with self.translated("connect"):
                    self._handle = await stack.enter_async_context(client)
                self._stack = stack
                self._loop = asyncio.get_running_loop()
            return self._handle

    def _no_bucket(self) -> StorageError:
        return StorageError(f"the bucket {self.bucket!r} does not exist (journal {self._journal})")

    @contextlib.contextmanager
    def translated(self, operation: str) -> Iterator[None]:
        """Turn botocore's exceptions inside the block into yoink's."""
        journal = self._journal
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _CONFLICT_CODES:
                raise Conflict(code) from exc
            if code == "NoSuchBucket":
                raise self._no_bucket() from exc
            if code in _MISSING_CODES:
                raise Missing(code) from exc
            if code in _DENIED_CODES:
                raise _AccessDenied(
                    f"S3 denied {operation} on {journal}: yoink needs {IAM_ACTIONS} on this bucket and key"
                ) from exc
            if code in _BAD_CREDENTIAL_CODES:
                raise StorageError(
                    f"S3 rejected the AWS credentials ({code}) for {journal}: check AWS_ACCESS_KEY_ID "
                    "and AWS_SECRET_ACCESS_KEY, the AWS_PROFILE in use, or the role's session token"
                ) from exc
            message = error.get("Message") or "no message"
            raise StorageError(f"S3 {operation} on {journal} failed: {code} ({message})") from exc
        except NoCredentialsError as exc:
            raise StorageError(
                f"no AWS credentials found for {journal}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, choose a profile (AWS_PROFILE or profile_name=), run "
                "'aws configure', or attach an IAM role"
            ) from exc
        except EndpointConnectionError as exc:
            where = redact(self.endpoint) if self.endpoint else "AWS"
            raise StorageError(f"cannot reach S3 at {where} for {journal}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 {operation} on {journal} failed: {type(exc).__name__}") from exc
