"""`make run`: a demo Dovecot on loopback with relayproxy in front of it.

Starts Dovecot (users alice/alice-secret and bob/bob-secret) in a state
directory, renders config/demo.ini with its ports, runs the relayproxy
daemon in the foreground and prints what to try. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from demo.dovecot import running_dovecot

ROOT = Path(__file__).resolve().parent.parent


def render(template: Path, values: dict[str, str]) -> str:
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state", type=Path, default=ROOT / ".demo", help="state directory")
    options = parser.parse_args()
    # Started from a background job, SIGINT arrives ignored: Ctrl-C (and a
    # plain kill) must still stop the demo and what it started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    state = options.state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    with running_dovecot(state / "dovecot") as dovecot:
        config = state / "relayproxy.ini"
        config.write_text(
            render(
                ROOT / "config" / "demo.ini",
                {
                    "STATE": str(state),
                    "POP3_PORT": str(dovecot.ports.pop3_haproxy),
                    "IMAP_PORT": str(dovecot.ports.imap_haproxy),
                    "CERTIFICATE": str(dovecot.server_certificate),
                    "PRIVATE_KEY": str(dovecot.server_key),
                },
            )
        )
        venv_bin = Path(sys.executable).parent
        ca = dovecot.ca_certificate
        print(
            f"""
relayproxy demo: Dovecot on 127.0.0.1:{dovecot.ports.pop3} (POP3) and :{dovecot.ports.imap} (IMAP);
relayproxy in front of them on 127.0.0.1:11110 (POP3) and 127.0.0.1:11143 (IMAP).
In another terminal, log in through the proxy (each from its own loopback address):

    curl --interface 127.0.0.5 -u alice:alice-secret pop3://127.0.0.1:11110/
    curl --interface 127.0.0.6 --ssl-reqd --cacert {ca} -u bob:bob-secret pop3://localhost:11110/
    curl --interface 127.0.0.7 -u alice:alice-secret imap://127.0.0.1:11143/

then see the recorded addresses:

    {venv_bin}/vsmtprelay --db {state}/relayers.db dump

Ctrl-C stops relayproxy and Dovecot.
""",
            flush=True,
        )
        daemon = subprocess.Popen(
            [sys.executable, "-m", "relayproxy.cli.daemon", "--config", str(config)]
        )
        try:
            return daemon.wait()
        except KeyboardInterrupt:
            daemon.send_signal(signal.SIGTERM)
            return daemon.wait()


if __name__ == "__main__":
    sys.exit(main())
