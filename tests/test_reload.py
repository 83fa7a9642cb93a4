"""SIGHUP reloads the config; an invalid one never brings the relay down (real gunicorn via the CLI)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.conftest import Relay, RelayFactory, wait_for

INVALID = "\n[campaigns.cmp_bad]\nallowed_origins = 5\n[campaigns.cmp_bad.events.x]\n"
NEW_CAMPAIGN = (
    '\n[campaigns.cmp_new]\nallowed_origins = ["https://www.example.com"]\n'
    "[campaigns.cmp_new.events.signup]\n"
)


def workers(relay: Relay) -> set[int]:
    """The master's child processes (gunicorn workers)."""
    assert relay.proc is not None
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == relay.proc.pid:
                found.add(int(entry.name))
    return found


def accepted(relay: Relay, cid: str = "cmp_test", event_id: str = "quote_viewed", txn: str = "t") -> bool:
    return relay.post({"event_id": event_id, "transaction_id": txn}, cid=cid).status_code in (200, 202)


def test_an_invalid_config_on_sighup_or_respawn_keeps_the_relay_serving(relay_factory: RelayFactory) -> None:
    relay = relay_factory(workers=1)
    assert relay.proc is not None
    original = relay.config_path.read_text()
    first = wait_for(lambda: workers(relay), message="a worker")

    relay.config_path.write_text(original + INVALID)
    os.kill(relay.proc.pid, signal.SIGHUP)
    wait_for(lambda: "campaigns.cmp_bad.allowed_origins" in relay.log(), message="the key path in the log")
    wait_for(lambda: (w := workers(relay)) and not (w & first) and w, message="the workers restarted")
    assert relay.proc.poll() is None, relay.log()
    assert accepted(relay, txn="after-bad-hup")

    # The file is still invalid when a worker dies and is respawned: the master's copy is used.
    second = workers(relay)
    for pid in second:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (w := workers(relay)) and not (w & second) and w, message="a respawned worker")
    wait_for(lambda: accepted(relay, txn="after-respawn"), message="the respawned worker serving")
    assert relay.proc.poll() is None and "Worker failed to boot" not in relay.log()

    # A valid edit is applied to the new workers (the sandbox, playing Pingtree, does not know
    # cmp_new and refuses it: any answer but the relay's own 404 shows the relay now has it).
    def new_campaign_status() -> int:
        return relay.post({"event_id": "signup", "transaction_id": "n"}, cid="cmp_new").status_code

    assert new_campaign_status() == 404
    relay.config_path.write_text(original + NEW_CAMPAIGN)
    os.kill(relay.proc.pid, signal.SIGHUP)
    wait_for(lambda: new_campaign_status() != 404, message="cmp_new served")
    assert relay.proc.poll() is None
