"""The SDK's ahead-of-time build: one minified script per combination of feature flags.

The way Plausible commits its compiled tracker variants: ``scripts/build-sdk`` renders
``js_templates/sdk.js.j2`` (plain, commented JavaScript) for every combination of the flags that
:func:`server.sdk.script_features` returns, with a placeholder where the campaign's config goes,
minifies every variant with terser (``scripts/sdk-minify.mjs``, the version pinned in
``package-lock.json``) and writes ``js_templates/compiled/``: one tiny Jinja template per variant
whose only placeholder is ``{{ cfg|tojson }}``, the debug panel (``debug_panel.js``, the same for
every campaign), and ``manifest.json`` with the hash of every input of the build. The relay renders the campaign's variant (:func:`server.sdk.render_sdk`) and never
runs Node.js; ``tests/test_sdk_build.py`` checks that the committed build is fresh.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import CampaignConfig
from .paths import JS_TEMPLATES
from .sdk import COMPILED, DEBUG_FLAG, DEBUG_PANEL_FILE, build_flags, templates, variant_name

# A global name that survives minification (the minifier renames locals only); the build swaps it
# for the Jinja slot that takes the campaign's config, as JSON, at serve time.
PLACEHOLDER = "__PINGTREE_CONFIG__"
CONFIG_SLOT = "{{ cfg|tojson }}"
# Outside the debug builds log() is a no-op: the minifier drops its calls, arguments and all.
NO_OP_OUTSIDE_DEBUG = ("log",)
SOURCE = "sdk.js.j2"
DEBUG_PANEL_SOURCE = "debug_panel.js"
COMPILED_DIR = JS_TEMPLATES / COMPILED
MANIFEST = "manifest.json"
# In a source checkout (the build is a developer's step; a wheel carries its output only).
CHECKOUT = JS_TEMPLATES.parent
MINIFY_SCRIPT = CHECKOUT / "scripts" / "sdk-minify.mjs"
LOCK_FILE = CHECKOUT / "package-lock.json"


def feature_flags() -> tuple[str, ...]:
    """The flags a script is built for: a campaign's features (:func:`script_features`) and ``debug``."""
    return tuple(sorted(build_flags(CampaignConfig(cid="any"))))


def feature_sets() -> list[dict[str, bool]]:
    """Every combination of the flags: each is one committed variant."""
    flags = feature_flags()
    return [
        dict(zip(flags, values, strict=True))
        for values in itertools.product((False, True), repeat=len(flags))
    ]


def render_source(features: Mapping[str, bool], cfg: Mapping[str, Any] | None = None) -> str:
    """The readable script for one feature set, before minification.

    Without ``cfg``, the config is the :data:`PLACEHOLDER` name, so the template must use ``cfg``
    exactly once, through ``|tojson`` (campaign values enter in one place); a real config gives the
    script as a campaign would get it unminified (for the record, as bench/ reports it).
    """
    source = templates.get_template(SOURCE).render(
        cfg=PLACEHOLDER if cfg is None else cfg, feature=dict(features)
    )
    if cfg is not None:
        return source
    quoted = json.dumps(PLACEHOLDER)  # what |tojson makes of the placeholder string
    if source.count(PLACEHOLDER) != 1 or source.count(quoted) != 1:
        raise ValueError(f"{SOURCE} must use cfg exactly once, as {CONFIG_SLOT}")
    return source.replace(quoted, PLACEHOLDER)


def to_template(minified: str) -> str:
    """A minified variant as a Jinja template: its code verbatim (raw), the config's slot between."""
    if minified.count(PLACEHOLDER) != 1 or "endraw" in minified:
        raise ValueError("the minified script must hold the config placeholder once, and no 'endraw'")
    before, after = minified.strip().split(PLACEHOLDER)
    return f"{{% raw %}}{before}{{% endraw %}}{CONFIG_SLOT}{{% raw %}}{after}{{% endraw %}}\n"


def source_files() -> list[Path]:
    """Every input of the build: the templates, the minifier's script and pinned version, this module."""
    templates_ = [p for p in JS_TEMPLATES.rglob("*") if p.is_file() and COMPILED_DIR not in p.parents]
    return sorted(templates_) + [MINIFY_SCRIPT, LOCK_FILE, Path(__file__).resolve()]


def template_constants() -> dict[str, Any]:
    """The values the template gets besides the campaign's: the relay's own (``click_ids``), rendered
    into every variant, so they are inputs of the build."""
    return {
        name: value
        for name, value in templates.globals.items()
        if isinstance(value, str | int | tuple | list)
    }


def sources_digest() -> str:
    """sha256 over every input's path and content, the flags and the constants: what manifest.json records."""
    digest = hashlib.sha256(json.dumps([feature_flags(), template_constants()], sort_keys=True).encode())
    for path in source_files():
        digest.update(path.relative_to(CHECKOUT).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def minifier_version() -> str:
    lock = json.loads(LOCK_FILE.read_text(encoding="utf-8"))
    return "terser " + lock["packages"]["node_modules/terser"]["version"]


def minify(sources: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Minify every source in one Node.js process (needs node, and ``npm ci`` run in the checkout).

    ``sources``: name -> ``{"code": ..., "pure_funcs": [...]}``, the functions whose calls may go.
    """
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed: apt-get install -y nodejs npm")
    result = subprocess.run(
        [node, str(MINIFY_SCRIPT)],
        input=json.dumps(dict(sources)),
        capture_output=True,
        text=True,
        cwd=CHECKOUT,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the minifier failed:\n{result.stderr}")
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def build(out_dir: Path) -> dict[str, Any]:
    """Write every variant and the manifest into ``out_dir`` (emptied first); return the manifest."""
    sets = feature_sets()
    names = [variant_name(features) for features in sets]
    sources: dict[str, dict[str, Any]] = {
        name: {
            "code": render_source(features),
            "pure_funcs": [] if features[DEBUG_FLAG] else list(NO_OP_OUTSIDE_DEBUG),
        }
        for name, features in zip(names, sets, strict=True)
    }
    sources[DEBUG_PANEL_FILE] = {
        "code": (JS_TEMPLATES / DEBUG_PANEL_SOURCE).read_text(encoding="utf-8"),
        "pure_funcs": [],
    }
    minified = minify(sources)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for name in names:
        (out_dir / name).write_text(to_template(minified[name]), encoding="utf-8")
    # Served as it is (no campaign value in it): plain JavaScript, not a template.
    (out_dir / DEBUG_PANEL_FILE).write_text(minified[DEBUG_PANEL_FILE] + "\n", encoding="utf-8")
    manifest = {
        "generated_by": "scripts/build-sdk: do not edit, edit js_templates/sdk.js.j2 and rebuild",
        "minifier": minifier_version(),
        "sources_sha256": sources_digest(),
        "flags": list(feature_flags()),
        "variants": sorted(names),
        "debug_panel": DEBUG_PANEL_FILE,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/build-sdk", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a temporary folder; exit 1 if it differs from the committed build",
    )
    args = parser.parse_args(argv)
    if not args.check:
        manifest = build(COMPILED_DIR)
        print(f"wrote {len(manifest['variants'])} variants to {COMPILED_DIR} ({manifest['minifier']})")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / COMPILED
        build(fresh)
        compared = filecmp.dircmp(fresh, COMPILED_DIR)
        _, differ, unreadable = filecmp.cmpfiles(fresh, COMPILED_DIR, compared.common_files, shallow=False)
        stale = compared.left_only + compared.right_only + differ + unreadable
    if stale:
        print(f"stale: {', '.join(sorted(stale))}: run scripts/build-sdk", file=sys.stderr)
        return 1
    print("the committed build is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
