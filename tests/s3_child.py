"""A process for S3 crash tests, killed by the test or by itself at a chosen moment.

Usage: python tests/s3_child.py MODE URI STAGE_DIR ENDPOINT [N]

- ``stage N``: write N records (no flush), print ``staged``, then wait to be killed.
- ``die-before-discard N``: write N records and flush; ``kill -9`` itself once the upload has
  returned and before the stage is cleared.
- ``die-after-merge-upload N`` / ``die-in-merge-upload N``: flush N segments one by one with
  ``merge_after=3``; ``kill -9`` itself in the first merge, after the merged object is written and
  before its sources are deleted, or between the merge's upload requests.
"""

from __future__ import annotations

import os
import signal
import sys

import anyio

from yoink.storage import S3Storage
from yoink.storage._s3_layout import Layout
from yoink.storage._stage import Stage


def die(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def main(mode: str, uri: str, stage_dir: str, endpoint: str, count: int) -> None:
    storage = S3Storage(uri, stage_dir=stage_dir, endpoint_url=endpoint, merge_after=3)
    if mode == "stage":
        for n in range(count):
            await storage.write(f'{{"n":{n}}}\n')
        print("staged", flush=True)
        await anyio.sleep(3600)
    elif mode == "die-before-discard":
        for n in range(count):
            await storage.write(f'{{"n":{n}}}\n')
        Stage.discard = die  # type: ignore[assignment,method-assign]
        await storage.flush()
    elif mode in ("die-after-merge-upload", "die-in-merge-upload"):
        upload = Layout._put

        async def upload_then_maybe_die(self: Layout, key: str, *args: object, **kwargs: object) -> str:
            merging = "-" in key.rsplit("/", 1)[-1]
            if merging and mode == "die-in-merge-upload":
                await self._client.call("create_multipart_upload", Key=key)
                die()
            etag = await upload(self, key, *args, **kwargs)  # type: ignore[arg-type]
            if merging:
                die()
            return etag

        Layout._put = upload_then_maybe_die  # type: ignore[assignment,method-assign]
        for n in range(count):
            await storage.write(f'{{"n":{n}}}\n')
            await storage.flush()
    sys.exit(f"{mode}: still alive")


if __name__ == "__main__":
    mode, uri, stage_dir, endpoint, *rest = sys.argv[1:]
    anyio.run(main, mode, uri, stage_dir, endpoint, int(rest[0]) if rest else 10)
