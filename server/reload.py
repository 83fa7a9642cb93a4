"""SIGHUP: reload the config without ever going down for a bad one.

gunicorn's HUP reloads its settings and restarts the workers gracefully; a worker that fails to
boot makes the master exit ("Worker failed to boot"). So workers never read the file: the master
validates it on HUP and keeps the last config that passed, and each worker, forked from the
master, builds its app from that object. An invalid edit is logged with the key path that is
wrong and the relay goes on with the previous config, through the reload and through any later
worker respawn; a valid one reaches every worker started after the HUP.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import Config, ConfigError, load_config

# The master's own log (gunicorn's error log): our logging setup only happens in the workers.
log = logging.getLogger("gunicorn.error")

# Set by serve's master for the delivery process it starts: the validated config's text.
CONFIG_TEXT_ENV = "PINGTREE_RELAY_CONFIG_TEXT"


class LastGoodConfig:
    """The config file at ``path`` as last validated by the master."""

    def __init__(self, path: str, config: Config, text: str | None = None) -> None:
        self.path = path
        self.config = config
        # The file's text as validated: the delivery process, a fresh exec, rebuilds from it.
        self.text = Path(path).read_text(encoding="utf-8") if text is None else text

    def environment(self) -> dict[str, str]:
        """What the delivery process needs to build the same config (see ``deliver``)."""
        return {CONFIG_TEXT_ENV: self.text}

    def reload(self) -> None:
        """Re-read the file; keep the previous config when the new one is invalid or unreadable."""
        try:
            text = Path(self.path).read_text(encoding="utf-8")
            config = load_config(self.path, text=text)
        except ConfigError as exc:
            log.error("reload refused, still serving the previous config: %s: %s", self.path, exc)
            return
        except OSError as exc:
            log.error(
                "reload refused, still serving the previous config: %s: %s", self.path, exc.strerror or exc
            )
            return
        self.config, self.text = config, text
        log.warning("reload: %s applied (%d campaigns) to the new workers", self.path, len(config.campaigns))
