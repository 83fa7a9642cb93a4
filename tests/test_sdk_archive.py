"""The archive of SDK builds: content-addressed files, retention counted from the last time current."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.sdk_archive import RETENTION_SECONDS, BuildArchive, default_dir, version_of
from tests.test_sdk import make_config


def keep(archive: BuildArchive, body: bytes, now: float) -> str:
    version = version_of(body)
    archive.remember("cmp_a", version, body, now=now)
    return version


def test_a_build_is_kept_for_the_retention_after_it_was_last_current(tmp_path: Path) -> None:
    archive = BuildArchive(tmp_path)
    old = keep(archive, b"old();", now=1000.0)
    new = keep(archive, b"new();", now=1000.0 + RETENTION_SECONDS)
    assert archive.get("cmp_a", old, now=1000.0 + RETENTION_SECONDS) == b"old();"
    assert archive.get("cmp_a", old, now=1001.0 + RETENTION_SECONDS) is None  # expired, even before a prune
    assert archive.prune(now=1001.0 + RETENTION_SECONDS) == 1
    assert [p.name for p in tmp_path.glob("*.js")] == [f"cmp_a.{new}.js"]


def test_being_current_again_extends_the_retention(tmp_path: Path) -> None:
    archive = BuildArchive(tmp_path)
    version = keep(archive, b"a();", now=1000.0)
    keep(archive, b"a();", now=1000.0 + RETENTION_SECONDS - 10)  # still current a month later: touched
    assert archive.get("cmp_a", version, now=1000.0 + RETENTION_SECONDS + 10) == b"a();"


def test_only_a_well_formed_version_is_looked_up(tmp_path: Path) -> None:
    archive = BuildArchive(tmp_path)
    keep(archive, b"a();", now=1000.0)
    for bad in ("../cmp_a", "ABCDEF0123456789", "0" * 15, "0" * 17, ""):
        assert archive.get("cmp_a", bad, now=1000.0) is None


def test_an_unwritable_directory_costs_the_archive_not_the_script(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    archive = BuildArchive(blocker / "sdk-builds")
    keep(archive, b"a();", now=1000.0)  # logged, never raised
    assert archive.get("cmp_a", version_of(b"a();"), now=1000.0) is None


def test_default_dir_is_beside_the_store_unless_configured(tmp_path: Path) -> None:
    assert default_dir(make_config(store=f"sqlite:///{tmp_path}/o.sqlite3")) == tmp_path / "sdk-builds"
    assert (
        default_dir(make_config(store="redis://127.0.0.1:6379/0", sdk_archive_dir=str(tmp_path / "x")))
        == tmp_path / "x"
    )


def test_sdk_archive_dir_is_checked_and_relative_to_the_config_file(tmp_path: Path) -> None:
    from server.config import ConfigError, load_config

    path = tmp_path / "relay.toml"
    path.write_text(
        '[relay]\nupstream_url = "http://127.0.0.1:1"\nstore = "redis://127.0.0.1:6379/0"\n'
        'sdk_archive_dir = "builds"\n'
    )
    config = load_config(path)
    assert config.relay.sdk_archive_dir == str(tmp_path.resolve() / "builds")
    assert default_dir(config) == tmp_path.resolve() / "builds"
    path.write_text(path.read_text().replace('"builds"', "7"))
    with pytest.raises(ConfigError, match=r"^relay\.sdk_archive_dir: expected a string$"):
        load_config(path)
