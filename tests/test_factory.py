"""StorageFactory: from a URI to a backend, the registry, and plugins."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.abc
import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from yoink import CheckpointManager, MissingDependencyError, StorageFactory, UnknownSchemeError
from yoink.storage import LocalFileStorage, MemoryStorage
from yoink.storage._factory import _BUILTIN, _Entry, journal_identity


@pytest.fixture(autouse=True)
def restore_registry() -> Iterator[None]:
    saved = dict(StorageFactory._registry)
    yield
    StorageFactory._registry.clear()
    StorageFactory._registry.update(saved)


class TinyStorage(MemoryStorage):
    def __init__(self, uri: str, *, colour: str = "red") -> None:
        super().__init__(uri)
        self.uri = uri
        self.colour = colour

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> TinyStorage:
        return cls(uri, **options)


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("./crawl.jsonl", "{cwd}/crawl.jsonl"),
        ("crawl.jsonl", "{cwd}/crawl.jsonl"),
        ("runs/a b.jsonl", "{cwd}/runs/a b.jsonl"),
        ("/abs/run.jsonl", "/abs/run.jsonl"),
        ("~/run.jsonl", "{home}/run.jsonl"),
        ("file:///abs/run.jsonl", "/abs/run.jsonl"),
        ("FILE:///abs/a%20b.jsonl", "/abs/a b.jsonl"),
        ("file://localhost/abs/run.jsonl", "/abs/run.jsonl"),
    ],
)
def test_paths_and_file_uris_give_a_local_file(uri: str, path: str) -> None:
    storage = StorageFactory.from_uri(uri)
    assert isinstance(storage, LocalFileStorage)
    assert storage.path == path.format(cwd=Path.cwd(), home=Path.home())


def test_a_path_object_is_a_local_file(tmp_path: Path) -> None:
    storage = StorageFactory.from_uri(tmp_path / "x.jsonl")
    assert isinstance(storage, LocalFileStorage)
    assert storage.path == str(tmp_path / "x.jsonl")


def test_memory_uris_name_a_shared_journal() -> None:
    storage = StorageFactory.from_uri("memory://crawl-test")
    assert isinstance(storage, MemoryStorage)
    assert storage.name == "crawl-test"


@pytest.mark.parametrize(
    ("uri", "error", "message"),
    [
        ("", ValueError, "a checkpoint URI or path is needed"),
        ("file://otherhost/x.jsonl", ValueError, "a file URI names a local path"),
        ("file:///x.jsonl#top", ValueError, "takes no fragment"),
        ("file:///x.jsonl?fsnyc=0", ValueError, "unknown option 'fsnyc' in file:///x.jsonl?fsnyc=0; "),
        ("memory://", ValueError, "a memory URI names a journal"),
        (
            "gopher://host/x",
            UnknownSchemeError,
            "no storage backend for gopher:// URIs; known schemes: abfs://, abfss://, adl://, az://, ",
        ),
        (
            "wais://host/x",
            ValueError,
            "fsspec+<protocol>://, ftp://, gcs://, gs://, hdfs://, memory://, redis://",
        ),
    ],
)
def test_bad_uris_are_refused_with_a_clear_error(uri: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        StorageFactory.from_uri(uri)


def test_a_backend_whose_dependency_is_missing_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "yoink_needs_extra.py").write_text("import yoink_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    StorageFactory._registry["gcs"] = _Entry(
        "yoink_needs_extra:GCSStorage", "the 'gcs' extra: pip install 'yoink[gcs]'"
    )
    with pytest.raises(
        MissingDependencyError,
        match="gcs:// URIs need the 'gcs' extra: pip install 'yoink\\[gcs\\]' "
        "\\(module 'yoink_absent_dependency' is missing\\)",
    ) as caught:
        StorageFactory.from_uri("gcs://bucket/key.jsonl")
    assert isinstance(caught.value, ImportError)


def test_a_backend_missing_from_this_install_says_to_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _Entry("yoink.storage._absent:GCSStorage", "the 'gcs' extra: pip install 'yoink[gcs]'")
    monkeypatch.setitem(StorageFactory._registry, "gs", entry)  # as a yoink too old for gs:// would see it
    with pytest.raises(
        MissingDependencyError,
        match=r"gs:// URIs need a yoink with that backend \(yoink.storage._absent is missing from this "
        r"install\); it comes with the 'gcs' extra: pip install -U 'yoink\[gcs\]'",
    ):
        StorageFactory.from_uri("gs://bucket/key.jsonl")


class Absent(importlib.abc.MetaPathFinder):
    """Finds nothing of ``package``, as on a machine where it is not installed."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == self.package or name.startswith(f"{self.package}."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.mark.parametrize(
    ("uri", "package", "extra", "module"),
    [
        ("s3://bucket/key.jsonl", "aioboto3", "s3", "yoink.storage._s3"),
        ("redis://localhost/0?key=k", "redis", "redis", "yoink.storage._redis"),
        ("unix:///run/redis.sock?key=k", "redis", "redis", "yoink.storage._redis"),
    ],
)
def test_a_backend_without_its_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, uri: str, package: str, extra: str, module: str
) -> None:
    # What an install without the extra has: the package is nowhere to be found.
    monkeypatch.setattr(sys, "meta_path", [Absent(package), *sys.meta_path])
    imported = [name for name in sys.modules if name.startswith((module, package))]
    for name in imported:  # yoink.storage._s3 and _s3_client, aioboto3 and its modules
        monkeypatch.delitem(sys.modules, name)
    scheme = uri.partition("://")[0]
    monkeypatch.setitem(StorageFactory._registry, scheme, _BUILTIN[scheme])
    with pytest.raises(
        MissingDependencyError,
        match=rf"{scheme}:// URIs need the '{extra}' extra: pip install 'yoink-checkpoint\[{extra}\]' "
        rf"\(module '{package}' is missing\)",
    ):
        StorageFactory.from_uri(uri)


def test_redis_uris_reach_redisstreamstorage_with_their_options() -> None:
    from yoink.storage import RedisStreamStorage

    storage = StorageFactory.from_uri("redis://localhost:6379/3?key=crawl-42", lease_ttl=5)
    assert isinstance(storage, RedisStreamStorage)
    assert (storage.key, storage._url) == ("crawl-42", "redis://localhost:6379/3")
    assert storage._options.lease_ttl == 5


def test_s3_uris_reach_s3storage_with_their_options(tmp_path: Path) -> None:
    from yoink.storage import S3Storage

    storage = StorageFactory.from_uri("s3://bucket/runs/a.jsonl?layout=segments", stage_dir=tmp_path)
    assert isinstance(storage, S3Storage)
    assert repr(storage) == "S3Storage('s3://bucket/runs/a.jsonl', layout='segments')"
    assert storage.stage_directory.startswith(str(tmp_path))
    manager = CheckpointManager.from_uri("s3://bucket/b.jsonl", flush_interval=None, part_size=8 << 20)
    assert isinstance(manager.storage, S3Storage)


def test_import_yoink_imports_no_optional_dependency() -> None:
    code = (
        "import sys, yoink, yoink.storage\n"
        "print(sorted(m for m in ('aioboto3', 'botocore', 'fsspec', 'redis') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_options_reach_the_backend_and_unknown_ones_are_named() -> None:
    assert StorageFactory.from_uri("/x.jsonl", fsync=False)._fsync is False  # type: ignore[attr-defined]
    with pytest.raises(
        TypeError, match="LocalFileStorage does not take the option\\(s\\) fsnyc; it takes: fsync"
    ):
        StorageFactory.from_uri("/x.jsonl", fsnyc=False)


def test_a_registered_class_gets_the_uri_and_the_options() -> None:
    StorageFactory.register("tiny", TinyStorage)
    storage = StorageFactory.from_uri("TINY://thing", colour="blue")
    assert isinstance(storage, TinyStorage)
    assert (storage.uri, storage.colour) == ("TINY://thing", "blue")
    assert "tiny" in StorageFactory.schemes()
    manager = CheckpointManager.from_uri("tiny://other", colour="green", flush_interval=None)
    assert isinstance(manager.storage, TinyStorage)
    assert manager.storage.colour == "green"


def test_a_dotted_path_is_imported_on_first_use() -> None:
    StorageFactory.register("tiny", "tests.test_factory:TinyStorage")
    assert StorageFactory._registry["tiny"].target == "tests.test_factory:TinyStorage"
    assert isinstance(StorageFactory.from_uri("tiny://x"), TinyStorage)
    assert StorageFactory.resolve("tiny") is TinyStorage


def test_registering_a_taken_scheme_needs_replace() -> None:
    with pytest.raises(
        ValueError, match="file:// is already registered to yoink.storage._local:LocalFileStorage"
    ):
        StorageFactory.register("file", TinyStorage)
    StorageFactory.register("tiny", TinyStorage)
    with pytest.raises(ValueError, match="pass replace=True"):
        StorageFactory.register("tiny", MemoryStorage)
    StorageFactory.register("tiny", MemoryStorage, replace=True)
    assert StorageFactory.resolve("tiny") is MemoryStorage


@pytest.mark.parametrize(
    ("scheme", "target", "error", "message"),
    [
        ("not a scheme", TinyStorage, ValueError, "is not a URI scheme"),
        ("9p", TinyStorage, ValueError, "is not a URI scheme"),
        ("tiny", dict, TypeError, "a backend is a CheckpointStorage subclass"),
        ("tiny", TinyStorage("x://"), TypeError, "a backend is a CheckpointStorage subclass"),
        ("tiny", "no dots here", ValueError, "is not a dotted path"),
    ],
)
def test_bad_registrations_are_refused(
    scheme: str, target: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        StorageFactory.register(scheme, target)
    assert "tiny" not in StorageFactory.schemes()


def test_a_dotted_path_that_does_not_hold_a_backend_fails_when_used() -> None:
    StorageFactory.register("nope", "tests.test_factory:NoSuchThing")
    with pytest.raises(
        ImportError, match="registered as 'tests.test_factory:NoSuchThing', which does not exist"
    ):
        StorageFactory.from_uri("nope://x")
    StorageFactory.register("dict", "builtins:dict")
    with pytest.raises(TypeError, match="is not a CheckpointStorage subclass"):
        StorageFactory.from_uri("dict://x")


def test_unregister_removes_a_scheme() -> None:
    StorageFactory.register("tiny", TinyStorage)
    StorageFactory.unregister("tiny://")
    with pytest.raises(UnknownSchemeError):
        StorageFactory.from_uri("tiny://x")
    with pytest.raises(KeyError, match="tiny:// is not registered"):
        StorageFactory.unregister("tiny")


def test_schemes_is_a_sorted_copy_that_callers_cannot_change() -> None:
    schemes = StorageFactory.schemes()
    assert schemes == tuple(sorted(schemes))
    assert set(_BUILTIN) <= set(schemes)
    assert isinstance(schemes, tuple)


def test_the_factory_is_not_instantiated() -> None:
    with pytest.raises(TypeError, match="class methods"):
        StorageFactory()


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A distribution on sys.path that declares backends in the yoink.storage entry-point group."""
    (tmp_path / "yoink_tiny.py").write_text(
        "from yoink.storage import MemoryStorage\n"
        "class TinyPluginStorage(MemoryStorage):\n"
        "    @classmethod\n"
        "    def from_uri(cls, uri, **options):\n"
        "        return cls(uri.partition('://')[2], **options)\n"
    )
    dist_info = tmp_path / "yoink_tiny-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: yoink-tiny\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[yoink.storage]\ntinyplug = yoink_tiny:TinyPluginStorage\nmemory = yoink_tiny:TinyPluginStorage\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(StorageFactory, "_plugins_loaded", False)
    yield
    sys.modules.pop("yoink_tiny", None)


@pytest.mark.usefixtures("installed_plugin")
def test_an_entry_point_plugs_in_a_scheme_but_never_takes_a_builtin_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = StorageFactory.from_uri("tinyplug://jobs")
    assert type(storage).__name__ == "TinyPluginStorage"
    assert storage.name == "jobs"  # type: ignore[attr-defined]
    assert type(StorageFactory.from_uri("memory://jobs")) is MemoryStorage
    assert "ignoring entry point 'yoink_tiny:TinyPluginStorage' of yoink-tiny for memory://" in caplog.text


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:///tmp/run.jsonl?fsync=false", {"_fsync": False}),
        (
            "redis://localhost/0?key=k&lease_ttl=5&wait_aof=yes&page_size=8",
            {
                "_lease.ms": 5000,
                "_options.wait_aof": True,
                "_options.page_size": 8,
                "_url": "redis://localhost/0",
            },
        ),
        (
            "s3://bucket/run?layout=segments&timeout=2.5&merge_after=3&retry_mode=adaptive",
            {
                "_options.layout": "segments",
                "_options.timeout": 2.5,
                "_options.merge_after": 3,
                "_options.retry_mode": "adaptive",
                "_uri": "s3://bucket/run",
            },
        ),
        ("fsspec+memory://bucket/run.jsonl?append=false", {"_append": False}),
    ],
)
def test_a_storages_own_options_in_the_uri_query_reach_it_as_their_types(
    uri: str, expected: dict[str, object], tmp_path: Path
) -> None:
    storage = StorageFactory.from_uri(uri)
    found = {name: functools.reduce(getattr, name.split("."), storage) for name in expected}
    assert found == expected  # typed, not the query's text


@pytest.mark.parametrize(
    ("module", "backend", "options"),
    [
        ("yoink.storage._s3", "S3Storage", "S3Options"),
        ("yoink.storage._redis", "RedisStreamStorage", "RedisOptions"),
        ("yoink.storage._fsspec", "FsspecStorage", "FsspecOptions"),
    ],
)
def test_a_backends_options_have_the_names_and_defaults_of_its_keywords(
    module: str, backend: str, options: str
) -> None:
    found = importlib.import_module(module)
    keywords = inspect.signature(getattr(found, backend)).parameters.values()
    expected = {p.name: p.default for p in keywords if p.kind is p.KEYWORD_ONLY}
    assert {f.name: f.default for f in dataclasses.fields(getattr(found, options))} == expected


def test_an_s3_uri_converts_every_option_in_its_query(tmp_path: Path) -> None:
    storage = StorageFactory.from_uri(f"s3://bucket/run.jsonl?part_size=8388608&stage_dir={tmp_path}")
    assert storage._options.changed() == {"part_size": 8388608, "stage_dir": str(tmp_path)}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "redis://:pw-secret@host/0?key=k&lease_ttl=abc",
            "bad option in redis://:***@host/0?key=k&lease_ttl=abc: "
            "lease_ttl='abc' is not a number, as in lease_ttl=30.0",
        ),
        ("redis://host/0?key=k&lease_ttl=nan&password=pw-secret", "lease_ttl='nan' is not a number"),
        (
            "redis://host/0?key=k&wait_aof=maybe",
            "wait_aof='maybe' is not true or false, as in wait_aof=false",
        ),
        ("redis://host/0?key=k&page_size=1.5", "page_size='1.5' is not a whole number, as in page_size=64"),
        ("redis://host/0?key=k&page_size=1&page_size=2", "page_size is given twice in redis://"),
        ("s3://bucket/run?layout=segment", "layout='segment' is not one of 'object', 'segments'"),
        ("fsspec+memory://b/r.jsonl?storage_options=x", "storage_options cannot be given in a URI"),
    ],
)
def test_a_bad_option_in_a_uri_is_a_value_error_that_names_it_and_hides_the_password(
    uri: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        StorageFactory.from_uri(uri)
    assert "pw-secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("uri", "option"),
    [
        ("redis://host/0?key=k&lease_ttl=5", {"lease_ttl": 5}),
        ("redis://host/0?key=k&lease_ttl=5", {"lease_ttl": 30.0}),  # even the default
        ("s3://bucket/run?layout=object", {"layout": "object"}),
        ("file:///tmp/run.jsonl?fsync=true", {"fsync": True}),
        ("fsspec+memory://b/r.jsonl?append=true", {"append": True}),
    ],
)
def test_an_option_given_both_in_the_uri_and_as_a_keyword_is_refused(
    uri: str, option: dict[str, Any]
) -> None:
    with pytest.raises(
        ValueError, match="given both in the URI .* and as a keyword option; give each option once"
    ):
        StorageFactory.from_uri(uri, **option)


def test_a_redis_uri_passes_on_what_redis_py_takes_and_refuses_the_rest() -> None:
    storage = StorageFactory.from_uri("redis://host/0?socket_timeout=3&key=k&client_name=job&lease_ttl=5")
    assert storage._url == "redis://host/0?socket_timeout=3&client_name=job"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown option") as caught:
        StorageFactory.from_uri("redis://:pw-secret@host/0?key=k&lease_tll=5")
    message = str(caught.value)
    assert message.startswith("unknown option 'lease_tll' in redis://:***@host/0?key=k&lease_tll=5; ")
    assert "RedisStreamStorage takes lease_ttl, wait_replicas" in message
    assert "redis-py's from_url takes " in message
    assert "socket_timeout" in message
    assert "pw-secret" not in message


@pytest.mark.parametrize(
    ("query", "key"),
    [("key=c++", "c++"), ("key=a%2Bb", "a+b"), ("key=a%26b%3Dc", "a&b=c"), ("key=%7Brun%7D:j", "{run}:j")],
)
def test_a_redis_key_is_percent_decoded_and_never_form_decoded(query: str, key: str) -> None:
    assert StorageFactory.from_uri(f"redis://host/0?{query}").key == key  # type: ignore[attr-defined]


def test_a_password_given_as_a_redis_query_parameter_stays_out_of_reprs_and_errors() -> None:
    manager = CheckpointManager.from_uri("redis://host/0?key=k&password=pw-secret", flush_interval=None)
    assert repr(manager) == "CheckpointManager(RedisStreamStorage('redis://host/0?password=***', key='k'))"
    assert "pw-secret" not in str(manager.storage._lease.locked(1000))  # type: ignore[attr-defined]
    assert manager.storage._url == "redis://host/0?password=pw-secret"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("uri", "error", "message"),
    [
        (
            "file:relative.jsonl",
            ValueError,
            "for a relative path, give the path itself, as in ./relative.jsonl",
        ),
        ("FILE:/abs.jsonl", ValueError, "a file URI is written file:///abs/run.jsonl"),
        ("C:\\runs\\a.jsonl", ValueError, "looks like a Windows path"),
        ("c:/runs/a.jsonl", ValueError, "looks like a Windows path"),
        ("gopher:x.jsonl", UnknownSchemeError, "no storage backend for gopher:// URIs"),
        ("run:1.jsonl", UnknownSchemeError, "a file whose name holds a colon is written as a path, as in ./"),
        ("memory:jobs", ValueError, "is not a URI: memory URIs are written memory://..."),
        ("s3:bucket/key", ValueError, "is not a URI: s3 URIs are written s3://..."),
    ],
)
def test_what_is_neither_a_path_nor_a_known_uri_is_refused(
    uri: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        StorageFactory.from_uri(uri)


def test_a_path_with_a_colon_after_its_first_part_or_a_question_mark_is_still_a_path() -> None:
    for uri in ("./run:1.jsonl", "runs/a:b.jsonl", "./what?.jsonl", "2024-01-01T10:00.jsonl"):
        assert isinstance(StorageFactory.from_uri(uri), LocalFileStorage)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("./same.jsonl", "{cwd}/same.jsonl"),
        ("file://{cwd}/same.jsonl", "./sub/../same.jsonl"),
        ("memory://jobs", "memory://jobs"),
        ("redis://localhost/0?key=k", "redis://:pw@127.0.0.1:6379?key=k&lease_ttl=5"),
        ("redis://host:6379/2?key=c%2B%2B", "redis://HOST/2?key=c++"),
        ("unix:///tmp/redis.sock?key=k", "unix:///tmp/../tmp/redis.sock?db=0&key=k"),
        ("s3://bucket/run.jsonl", "s3://bucket/run.jsonl?timeout=5"),
        ("fsspec+memory://b/run.jsonl", "fsspec+memory://b/run.jsonl?append=true"),
    ],
)
def test_one_journal_spelt_two_ways_has_one_identity(first: str, second: str) -> None:
    def identity(uri: str) -> object:
        return journal_identity(StorageFactory.from_uri(uri.format(cwd=Path.cwd())))

    assert identity(first) == identity(second) is not None


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("./a.jsonl", "./b.jsonl"),
        ("redis://localhost/0?key=k", "redis://localhost/1?key=k"),
        ("redis://localhost/0?key=k", "redis://localhost:6380/0?key=k"),
        ("redis://localhost/0?key=k", "redis://localhost/0?key=j"),
        ("s3://bucket/run", "s3://bucket/run?layout=segments"),
        ("s3://bucket/run", "s3://other/run"),
        ("memory://a", "memory://b"),
    ],
)
def test_two_journals_have_two_identities(first: str, second: str) -> None:
    assert journal_identity(StorageFactory.from_uri(first)) != journal_identity(
        StorageFactory.from_uri(second)
    )
