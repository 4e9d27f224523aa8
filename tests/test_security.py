"""SASL_SSL end to end: a broker of our own with a TLS + SCRAM-SHA-512 listener (streams/kafka/broker.py
`SaslSslListener`), a real worker process and the `lsti publish` / `lsti consume` CLIs as subprocesses, all
given only that listener and the LSTI_KAFKA_* settings. Then the refusals: no credentials, a wrong
password, no username, an untrusted certificate, each a one-line `error:` naming authentication (or TLS)
and a non-zero exit, fast. No password appears in the worker log, the CLI outputs or the broker log.

The session broker of conftest is not touched: this module starts its own (certificates made with openssl
in a tmp dir: a CA, a broker certificate for localhost/127.0.0.1, a PKCS12 keystore, the PEM CA file).
Waits fail when nothing moves for STALL_S seconds, not at a fixed deadline: the machine may be loaded.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from streams.config import REPO
from streams.contracts.events import event_json
from streams.kafka.broker import EmbeddedKafka, SaslSslListener

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("java") is None, reason="needs a JDK (java) to run the Kafka broker"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make test certificates"),
]

STALL_S = 120.0  # a wait fails when its progress measure has not moved for this long
N_EVENTS = 24
USER = "alice"
# Random per run and hex only (the SCRAM syntax of kafka-storage), so a grep for them finds only leaks.
PASSWORD = f"pw{secrets.token_hex(12)}"
WRONG_PASSWORD = f"pw{secrets.token_hex(12)}"
STORE_PASSWORD = f"ks{secrets.token_hex(12)}"
SECRETS = (PASSWORD, WRONG_PASSWORD, STORE_PASSWORD)
SECURITY_VARS = ("LSTI_KAFKA_SECURITY_PROTOCOL", "LSTI_KAFKA_SASL_MECHANISM", "LSTI_KAFKA_SASL_USERNAME",
                 "LSTI_KAFKA_SASL_PASSWORD", "LSTI_KAFKA_SSL_CAFILE", "LSTI_KAFKA_SSL_CERTFILE",
                 "LSTI_KAFKA_SSL_KEYFILE")


def make_certificates(d: Path, store_password: str) -> dict[str, Path]:
    """A CA, a broker certificate for localhost/127.0.0.1 signed by it, the PKCS12 keystore, the PEM CA."""
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, stdin=subprocess.DEVNULL)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=lsti-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
            "-subj", "/CN=localhost")
    (d / "broker.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
                                  "keyUsage=critical,digitalSignature,keyEncipherment\n")
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "broker.pem", "-days", "2", "-extfile", "broker.ext")
    openssl("pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key", "-certfile", "ca.pem",
            "-name", "broker", "-out", "broker.p12", "-passout", f"pass:{store_password}")
    return {"keystore": d / "broker.p12", "cafile": d / "ca.pem"}


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    """(broker, CA file) of a broker whose clients use its SASL_SSL listener (user alice)."""
    certs = make_certificates(tmp_path_factory.mktemp("certs"), STORE_PASSWORD)
    listener = SaslSslListener(certs["keystore"], STORE_PASSWORD, {USER: PASSWORD})
    broker = EmbeddedKafka(tmp_path_factory.mktemp("kafka-sasl"), heap_mb=256, sasl_ssl=listener)
    broker.start()
    try:
        yield broker, certs["cafile"]
    finally:
        broker.stop()


def _env(cafile: Path | None, username: str | None = USER, password: str | None = PASSWORD) -> dict[str, str]:
    """This process's environment without any LSTI_KAFKA_* setting, plus SASL_SSL ones when cafile is given."""
    env = {k: v for k, v in os.environ.items() if k not in SECURITY_VARS}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if cafile is not None:
        env.update(LSTI_KAFKA_SECURITY_PROTOCOL="SASL_SSL", LSTI_KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
                   LSTI_KAFKA_SSL_CAFILE=str(cafile))
        if username is not None:
            env["LSTI_KAFKA_SASL_USERNAME"] = username
        if password is not None:
            env["LSTI_KAFKA_SASL_PASSWORD"] = password
    return env


def _wait(done: Callable[[], bool], progress: Callable[[], object], what: str, detail: Callable[[], str]) -> None:
    """Until `done()`; fails when `progress()` has not changed for STALL_S seconds."""
    last, moved = progress(), time.monotonic()
    while not done():
        now = progress()
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            pytest.fail(f"{what}: no progress for {STALL_S:.0f}s\n{detail()}")
        time.sleep(0.3)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _lsti(args: list[str], env: dict, stdin: str | None = None, guard_s: float = 600) -> subprocess.CompletedProcess:
    """One `lsti` CLI run; `guard_s` only stops a hang from blocking the session (it must end by itself)."""
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=str(REPO), timeout=guard_s)


def _assert_no_secret(name: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a password appears in {name}"


def _failed_authentications(broker: EmbeddedKafka) -> int:
    return broker.log_path.read_text(errors="replace").count("Failed authentication with /127.0.0.1")


def test_worker_publish_consume_over_sasl_ssl(secure_broker, tiny_artifact, tmp_path, namespace):
    from streams.worker.process import WorkerProcess

    broker, cafile = secure_broker
    bootstrap, prefix, env = broker.sasl_ssl_bootstrap, namespace["prefix"], _env(cafile)
    assert bootstrap != broker.bootstrap  # the clients below never see the loopback PLAINTEXT listener
    worker = WorkerProcess(bootstrap, tiny_artifact, tmp_path / "w1", log_path=tmp_path / "w1.log",
                           extra=["--app-id", namespace["app_id"], "--topic-prefix", prefix],
                           env={**env, "LSTI_SESSION_TIMEOUT": "3"})
    worker.start()
    try:
        # ready = the agent has partitions: topics made, consumer group joined, all through SASL_SSL
        _wait(lambda: "Ready" in worker.log_text() or worker.proc.poll() is not None,
              lambda: _size(worker.log_path), "worker start", worker.tail)
        assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}:\n{worker.tail()}"

        sent = [json.loads(event_json(f"e{j}", f"u{j % 6}", f"i{(j * 7) % 50}", "view", 1_600_000_000 + j))
                for j in range(N_EVENTS)]
        pub = _lsti(["publish", "--bootstrap", bootstrap, "--topic-prefix", prefix, "-q", "-"], env,
                    stdin="".join(json.dumps(e) + "\n" for e in sent))
        assert pub.returncode == 0, pub.stderr
        assert f"published {N_EVENTS} events to {prefix}events" in pub.stderr

        out, err = tmp_path / "consume.out", tmp_path / "consume.err"
        with open(out, "w") as fo, open(err, "w") as fe:
            con = subprocess.Popen([sys.executable, "-m", "streams.cli", "consume", "--bootstrap", bootstrap,
                                    "--topic-prefix", prefix, "--from-beginning", "--max", str(N_EVENTS),
                                    "--timeout", str(STALL_S)], stdout=fo, stderr=fe, env=env, cwd=str(REPO))
            try:
                _wait(lambda: con.poll() is not None, lambda: (_size(out), _size(worker.log_path)),
                      "recommendations", lambda: f"consume: {err.read_text()[-3000:]}\nworker:\n{worker.tail()}")
            finally:
                if con.poll() is None:
                    con.kill()
                    con.wait()
        assert con.returncode == 0, err.read_text()[-3000:]
        got = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        assert sorted(r["event_id"] for r in got) == sorted(e["event_id"] for e in sent)
        assert all(len(r["items"]) == 10 and r["model_version"] == "tiny-v1" for r in got)
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/health", timeout=30) as r:
            health = json.loads(r.read())
        assert health["consumed"] == health["applied"] == N_EVENTS

        log = worker.log_text()
        assert "swigfaiss" not in log  # faiss's expected loader fallback is not logged
        assert "Traceback" not in log, log[-3000:]
        for name, text in (("the worker log", log), ("lsti publish", pub.stdout + pub.stderr),
                           ("lsti consume", out.read_text() + err.read_text())):
            _assert_no_secret(name, text)
    finally:
        worker.stop()
    _assert_no_secret("the worker log", worker.log_text())
    _assert_no_secret("the broker log", broker.log_path.read_text(errors="replace"))


REFUSED = {
    # name: (environment, what the one error line must say)
    "no credentials (plaintext client)": (lambda ca: _env(None), "authentication"),
    "wrong password": (lambda ca: _env(ca, password=WRONG_PASSWORD), "authentication failed"),
    "no username": (lambda ca: _env(ca, username=None, password=None), "authentication"),
    "untrusted certificate": (lambda ca: {**_env(ca), "LSTI_KAFKA_SSL_CAFILE": ""}, "not trusted"),
}


@pytest.mark.parametrize("command", ["publish", "consume"])
def test_clients_without_valid_credentials_are_refused(secure_broker, command):
    broker, cafile = secure_broker
    bootstrap = broker.sasl_ssl_bootstrap
    args = {"publish": ["publish", "--bootstrap", bootstrap, "-q", "-"],
            "consume": ["consume", "--bootstrap", bootstrap, "--from-beginning", "--max", "1"]}[command]
    stdin = event_json("x1", "u1", "i1", "view", 1_600_000_000).decode() + "\n" if command == "publish" else None
    failed_before = _failed_authentications(broker)
    for name, (make_env, says) in REFUSED.items():
        t0 = time.monotonic()
        res = _lsti(args, make_env(cafile), stdin=stdin)
        took = time.monotonic() - t0
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode != 0, f"{command} with {name} was not refused: {res.stderr[-2000:]}"
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], \
            f"{command} with {name}: want one line `error: ...{says}...`, got:\n{res.stderr[-2000:]}"
        assert res.stdout == "", res.stdout[-500:]
        assert took < 60, f"{command} with {name} took {took:.0f}s to fail"  # fails fast: no retry loop
        _assert_no_secret(f"lsti {command} with {name}", res.stdout + res.stderr)
        print(f"{command} / {name}: exit {res.returncode} in {took:.1f}s: {lines[0]}")
    # the broker itself refused the wrong password (not only our client check)
    assert _failed_authentications(broker) > failed_before
    _assert_no_secret("the broker log", broker.log_path.read_text(errors="replace"))
