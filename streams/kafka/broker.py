"""Embedded Apache Kafka broker: a stock single-node KRaft broker run as a plain JVM subprocess.

Why: the project must run (and its integration tests pass) on a bare machine with a JDK and Maven but
no Docker and no Kafka tarball. The broker jars are resolved once from Maven Central through
``deploy/kafka/pom.xml`` into ``${LSTI_CACHE:-~/.cache/lsti}/kafka-<version>/libs`` and the broker is
started with ``java -cp "<libs>/*" kafka.Kafka server.properties``. Being the real Apache Kafka (not a
mock), it behaves exactly as a production cluster does for Faust, aiokafka and kafka-python.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

KAFKA_VERSION = "3.9.2"
"""Default Apache Kafka version; 3.9 is the last line that ships a log4j-1 (reload4j) broker in one jar."""

POM_PATH = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "pom.xml"
_MARKER = ".lsti-resolved"
_STATE_FILE = "broker.json"
_CLUSTER_ID_FILE = "cluster.id"
_LOG_FILE = "kafka.log"
_LOG_ROTATE_BYTES = 64 * 1024 * 1024
_HOST = "127.0.0.1"


# --------------------------------------------------------------------------- jar resolution


def cache_root() -> Path:
    """Root of the per-user cache, shared by every checkout so the jars are fetched only once."""
    return Path(os.environ.get("LSTI_CACHE") or "~/.cache/lsti").expanduser()


def jar_cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Folder holding the broker classpath for ``version`` (used as ``-cp "<dir>/*"``)."""
    return cache_root() / f"kafka-{version}" / "libs"


def _require_tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"`{name}` was not found on PATH; it is needed {why}. Install a JDK 17+ and Maven 3.8+ "
            f"(e.g. `apt-get install openjdk-17-jre-headless maven`)."
        )
    return path


def ensure_kafka_jars(version: str = KAFKA_VERSION, quiet: bool = False) -> Path:
    """Return the folder with the Kafka broker jars, resolving them with Maven on first use.

    Why a marker and a rename: an interrupted download must never leave a half-filled classpath that
    later fails in obscure ways; the folder appears atomically with its marker inside. A file lock
    makes concurrent first uses (parallel tests, several workers) wait for one resolver.
    """
    libs = jar_cache_dir(version)
    if (libs / _MARKER).is_file():
        return libs
    _require_tool("java", "to run the embedded Kafka broker")
    mvn = _require_tool("mvn", "to resolve the Apache Kafka jars from Maven Central (first use only)")
    if not POM_PATH.is_file():
        raise RuntimeError(f"missing {POM_PATH}; it lists the jars of the embedded Kafka broker")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".resolve.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (libs / _MARKER).is_file():  # another process resolved while we waited
            return libs
        if not quiet:
            print(
                f"resolving Apache Kafka {version} jars from Maven Central (first use only)...",
                file=sys.stderr,
                flush=True,
            )
        tmp = libs.parent / f"libs.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-f", str(POM_PATH), "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}", "-DincludeScope=runtime", f"-Dkafka.version={version}",
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            core = tmp / f"kafka_2.13-{version}.jar"
            if proc.returncode != 0 or not core.is_file():
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
                raise RuntimeError(
                    f"could not resolve Apache Kafka {version} with Maven (exit {proc.returncode}); "
                    f"command: {' '.join(cmd)}\n{tail}"
                )
            (tmp / _MARKER).write_text(json.dumps({"version": version, "resolved_at": time.time()}) + "\n")
            if libs.exists():  # leftover without marker: an older interrupted attempt
                shutil.rmtree(libs)
            os.rename(tmp, libs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not quiet:
            print(f"Apache Kafka {version} jars ready in {libs}", file=sys.stderr, flush=True)
    return libs


# --------------------------------------------------------------------------- small helpers


def _port_free(port: int) -> bool:
    """True if a listener could bind ``port`` on loopback (SO_REUSEADDR, as the JVM does on Linux)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((_HOST, port))
        except OSError:
            return False
    return True


def _free_port(exclude: tuple[int, ...] = ()) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((_HOST, 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port


def _port_answers(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_is_kafka(pid: int) -> bool:
    """True if ``pid`` is alive and is a Kafka broker JVM (guards against pid reuse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no procfs: trust the pid
    return b"kafka.Kafka" in cmdline


def _read_state(data_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((data_dir / _STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(data_dir: Path, state: dict[str, Any]) -> None:
    tmp = data_dir / f".{_STATE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, data_dir / _STATE_FILE)


def _new_cluster_id() -> str:
    """A Kafka ``Uuid`` in its base64 form, as ``kafka-storage random-uuid`` prints (saves a JVM start)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _prop(value: str | Path) -> str:
    return str(value).replace("\\", "\\\\")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


_PR_SET_PDEATHSIG = 1
_LIBC: Any = None
if sys.platform == "linux":
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child must not import/load after fork


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def find_running_broker(data_dir: Path) -> str | None:
    """Bootstrap of the broker already running on ``data_dir`` (any process started it), else None.

    Why: the CLI, workers and tests reuse a broker started by ``lsti broker`` instead of starting a
    second JVM on the same log directory (which Kafka would refuse anyway).
    """
    state = _read_state(Path(data_dir))
    pid, bootstrap = state.get("pid"), state.get("bootstrap")
    if not isinstance(pid, int) or not isinstance(bootstrap, str) or not _pid_is_kafka(pid):
        return None
    try:
        port = int(bootstrap.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None
    return bootstrap if _port_answers(port) else None


# --------------------------------------------------------------------------- the broker


SCRAM_MECHANISM = "SCRAM-SHA-512"
_SCRAM_USERS_FILE = "scram-users.json"
_SCRAM_UNSAFE = set(',[]="\\\'') | {" ", "\t", "\n"}


@dataclass(frozen=True)
class SaslSslListener:
    """An extra client listener ``SASL_SSL://127.0.0.1:<port>`` with SCRAM-SHA-512 users (``sasl_ssl=``).

    ``keystore``: the broker's key and certificate (PKCS12 by default; its certificate must name
    ``127.0.0.1``/``localhost``, clients check it against their CA file). ``users``: SCRAM-SHA-512
    name -> password, created when the storage is formatted (KRaft has no other way before the broker
    runs), i.e. on the first start of a ``data_dir``; a later start with other users is refused.
    ``truststore`` + ``client_auth="required"`` adds mutual TLS. The PLAINTEXT listener stays on
    loopback for the broker's own (inter-broker, controller) traffic and the readiness probe; clients
    that must authenticate are given ``EmbeddedKafka.sasl_ssl_bootstrap`` only.
    """

    keystore: Path
    keystore_password: str = field(repr=False)
    users: Mapping[str, str] = field(repr=False)
    truststore: Path | None = None
    truststore_password: str | None = field(default=None, repr=False)
    keystore_type: str = "PKCS12"
    client_auth: str = "none"  # none, requested, required (the latter two need the truststore)
    port: int | None = None

    def __post_init__(self) -> None:
        if not self.users:
            raise ValueError("SaslSslListener needs at least one SCRAM user")
        for name, password in self.users.items():
            if not name or not password or _SCRAM_UNSAFE & set(name + password):
                raise ValueError(
                    f"SCRAM user {name!r}: name and password must be non-empty, without spaces, quotes, "
                    "commas, brackets or '=' (kafka-storage --add-scram syntax)"
                )
        if self.client_auth not in ("none", "requested", "required"):
            raise ValueError(f"client_auth must be none, requested or required, not {self.client_auth!r}")
        if self.client_auth != "none" and self.truststore is None:
            raise ValueError(f"client_auth={self.client_auth!r} needs a truststore")

    def secrets(self) -> list[str]:
        """Every password this listener knows (to redact them from error messages)."""
        return [p for p in (self.keystore_password, self.truststore_password, *self.users.values()) if p]

    def properties(self) -> dict[str, str]:
        """server.properties entries of the listener named SASL_SSL (beside the listener lists)."""
        jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        out = {
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": SCRAM_MECHANISM,
            f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": jaas,
            "listener.name.sasl_ssl.ssl.keystore.type": self.keystore_type,
            "listener.name.sasl_ssl.ssl.keystore.location": _prop(Path(self.keystore).resolve()),
            "listener.name.sasl_ssl.ssl.keystore.password": _prop(self.keystore_password),
            "listener.name.sasl_ssl.ssl.client.auth": self.client_auth,
        }
        if self.truststore is not None:
            out["listener.name.sasl_ssl.ssl.truststore.type"] = self.keystore_type
            out["listener.name.sasl_ssl.ssl.truststore.location"] = _prop(Path(self.truststore).resolve())
            if self.truststore_password:
                out["listener.name.sasl_ssl.ssl.truststore.password"] = _prop(self.truststore_password)
        return out

    def scram_args(self) -> list[str]:
        """``kafka-storage format`` arguments creating the users."""
        out: list[str] = []
        for name, password in self.users.items():
            out += ["--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]"]
        return out


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class EmbeddedKafka:
    """One single-node KRaft Apache Kafka broker (broker + controller) living in ``data_dir``.

    ``data_dir`` keeps everything: ``server.properties``, ``log4j.properties``, the KRaft log dir,
    ``kafka.log`` (JVM stdout/stderr) and ``broker.json`` (bootstrap, ports, pid) so a restart on the
    same folder finds its data, cluster id and, when still free, the same ports.

    ``die_with_parent`` (Linux) sends the broker SIGTERM when the thread that started it dies, so a
    killed test run or CLI never leaves an orphan JVM behind; start it from a long-lived thread.

    ``sasl_ssl`` (a ``SaslSslListener``) adds a SASL_SSL/SCRAM-SHA-512 client listener at
    ``sasl_ssl_bootstrap``; without it the broker is plaintext only, as before.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        heap_mb: int = 384,
        version: str = KAFKA_VERSION,
        die_with_parent: bool = True,
        sasl_ssl: SaslSslListener | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.version = version
        self.heap_mb = int(heap_mb)
        self.die_with_parent = die_with_parent
        self._requested_port = port
        self._port: int | None = port
        self._controller_port: int | None = None
        self.sasl_ssl = sasl_ssl
        self._sasl_port: int | None = sasl_ssl.port if sasl_ssl else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ properties

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:<port>`` of the PLAINTEXT listener (known once started)."""
        if self._port is None:
            raise RuntimeError("EmbeddedKafka has no port yet: call start() first")
        return f"{_HOST}:{self._port}"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def sasl_ssl_bootstrap(self) -> str:
        """``127.0.0.1:<port>`` of the SASL_SSL listener (needs ``sasl_ssl`` and a start)."""
        if self.sasl_ssl is None:
            raise RuntimeError("EmbeddedKafka has no SASL_SSL listener: pass sasl_ssl=SaslSslListener(...)")
        if self._sasl_port is None:
            raise RuntimeError("EmbeddedKafka has no port yet: call start() first")
        return f"{_HOST}:{self._sasl_port}"

    @property
    def controller_port(self) -> int | None:
        return self._controller_port

    @property
    def pid(self) -> int | None:
        """Pid of the broker JVM while it runs, else None."""
        return self._proc.pid if self.alive() and self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_FILE

    def alive(self) -> bool:
        """True while the JVM this object started has not exited."""
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 120) -> str:
        """Start the broker (formatting storage on first use) and return its bootstrap once it answers.

        Why wait for a metadata answer rather than an open port: clients that connect earlier see a
        broker with no registered node and fail with confusing errors.
        """
        with self._lock:
            if self.alive():
                return self.bootstrap
            self.data_dir.mkdir(parents=True, exist_ok=True)
            other = find_running_broker(self.data_dir)
            if other is not None:
                pid = _read_state(self.data_dir).get("pid")
                raise RuntimeError(
                    f"a Kafka broker already runs on {self.data_dir} at {other} (pid {pid}); "
                    "use find_running_broker() to reuse it or stop it first"
                )
            libs = ensure_kafka_jars(self.version)
            deadline = time.monotonic() + timeout
            attempts = 1 if self._requested_port else 3  # picked ports may be taken before the JVM binds
            for attempt in range(attempts):
                self._choose_ports(fresh=attempt > 0)
                self._write_config()
                self._format_storage(libs)
                self._launch(libs)
                try:
                    self._wait_ready(deadline)
                    return self.bootstrap
                except RuntimeError as exc:
                    self._kill()
                    if "Address already in use" in str(exc) and attempt + 1 < attempts:
                        continue
                    raise
            raise AssertionError("unreachable")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the broker and wait for its clean shutdown (SIGKILL after ``timeout`` seconds).

        Why a clean stop: Kafka then skips log recovery on the next start, which keeps restarts fast.
        """
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
            self._cleanup()

    def __enter__(self) -> EmbeddedKafka:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running pid={self.pid} at {self.bootstrap}" if self.alive() else "stopped"
        return f"<EmbeddedKafka {self.version} {self.data_dir} {state}>"

    # ------------------------------------------------------------------ internals

    def _choose_ports(self, fresh: bool) -> None:
        """Reuse the ports of the last run when free, so clients' saved bootstraps stay valid."""
        state = {} if fresh else _read_state(self.data_dir)
        if self._requested_port:
            port = self._requested_port
        else:
            port = state.get("port")
            if not (isinstance(port, int) and _port_free(port)):
                port = _free_port()
        cport = state.get("controller_port")
        if not (isinstance(cport, int) and cport != port and _port_free(cport)):
            cport = _free_port(exclude=(port,))
        self._port, self._controller_port = port, cport
        if self.sasl_ssl is not None:
            sport = self.sasl_ssl.port or state.get("sasl_ssl_port")
            if not self.sasl_ssl.port and not (
                isinstance(sport, int) and sport not in (port, cport) and _port_free(sport)
            ):
                sport = _free_port(exclude=(port, cport))
            self._sasl_port = sport

    def _cluster_id(self) -> str:
        path = self.data_dir / _CLUSTER_ID_FILE
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        cid = _new_cluster_id()
        path.write_text(cid + "\n")
        return cid

    def _write_config(self) -> None:
        d = self.data_dir
        logs = d / "kraft-logs"
        props = {
            # single node: combined KRaft broker + controller, static one-voter quorum
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{_HOST}:{self._controller_port}",
            "listeners": f"PLAINTEXT://{_HOST}:{self._port},CONTROLLER://{_HOST}:{self._controller_port}",
            "advertised.listeners": f"PLAINTEXT://{_HOST}:{self._port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": _prop(logs),
            # one replica of everything
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # developer conveniences
            "group.initial.rebalance.delay.ms": "0",
            # Fast failover in tests and on one machine: clients may ask for sessions down to 1 s.
            "group.min.session.timeout.ms": "1000",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            "num.partitions": "4",
            "log.retention.hours": "-1",
            "message.max.bytes": str(2 * 1024 * 1024),
            "replica.fetch.max.bytes": str(2 * 1024 * 1024),
            # small footprint next to tests on a 2-core machine
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "num.replica.fetchers": "1",
            "log.cleaner.threads": "1",
            "log.cleaner.backoff.ms": "2000",  # default 15 s: compaction (forgotten users) shows sooner
            "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),  # default 128 MiB of heap
            "log.segment.bytes": str(256 * 1024 * 1024),
            "log.retention.check.interval.ms": "300000",
        }
        if self.sasl_ssl is not None:
            sasl = f"SASL_SSL://{_HOST}:{self._sasl_port}"
            props["listeners"] += f",{sasl}"
            props["advertised.listeners"] += f",{sasl}"
            props["listener.security.protocol.map"] += ",SASL_SSL:SASL_SSL"
            props.update(self.sasl_ssl.properties())
        (d / "server.properties").write_text(
            "# written by streams/kafka/broker.py on every start; edits are overwritten\n"
            + "".join(f"{k}={v}\n" for k, v in props.items())
        )
        (d / "log4j.properties").write_text(_LOG4J)

    def _format_storage(self, libs: Path) -> None:
        """Format the KRaft log dir once; later starts reuse it (and the saved cluster id).

        SCRAM users of a ``sasl_ssl`` listener are created here (``--add-scram``): only their names are
        kept (``scram-users.json``), so a later start asking for other users is refused, not ignored.
        """
        users_file = self.data_dir / _SCRAM_USERS_FILE
        wanted = sorted(self.sasl_ssl.users) if self.sasl_ssl is not None else []
        if (self.data_dir / "kraft-logs" / "meta.properties").is_file():
            if wanted:
                try:
                    have = json.loads(users_file.read_text())
                except (OSError, ValueError):
                    have = []
                if have != wanted:
                    raise RuntimeError(
                        f"{self.data_dir} was formatted with SCRAM users {have}, not {wanted}: SCRAM users "
                        "are created when the storage is formatted; use a fresh data_dir"
                    )
            return
        cmd = [
            "java", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
            "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format",
            "-t", self._cluster_id(), "-c", str(self.data_dir / "server.properties"),
        ]  # fmt: skip
        secrets: list[str] = []
        if self.sasl_ssl is not None:
            cmd += self.sasl_ssl.scram_args()
            secrets = self.sasl_ssl.secrets()
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(
                f"kafka-storage format failed (exit {proc.returncode}) in {self.data_dir}:\n"
                + _redact("\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:]), secrets)
            )
        if wanted:
            users_file.write_text(json.dumps(wanted) + "\n")

    def _launch(self, libs: Path) -> None:
        d = self.data_dir
        log_path = self.log_path
        if log_path.is_file() and log_path.stat().st_size > _LOG_ROTATE_BYTES:
            os.replace(log_path, log_path.with_suffix(".log.1"))
        self._log = open(log_path, "ab")  # owned until stop()
        self._log.write(
            f"\n===== lsti: starting Apache Kafka {self.version} at {time.ctime()} =====\n".encode()
        )
        self._log.flush()
        cmd = [
            "java",
            f"-Xms{min(self.heap_mb, max(64, self.heap_mb // 4))}m",
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseSerialGC",
            "-XX:+ExitOnOutOfMemoryError",
            "-XX:-UsePerfData",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{d / 'log4j.properties'}",
            f"-Dkafka.logs.dir={d}",
            "-cp", f"{libs}/*",
            "kafka.Kafka", str(d / "server.properties"),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd,
            cwd=d,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: a Ctrl-C in the terminal doesn't kill it mid-write
            preexec_fn=_die_with_parent if self.die_with_parent and _LIBC is not None else None,
        )
        _write_state(
            d,
            {
                "bootstrap": self.bootstrap,
                "pid": self._proc.pid,
                "version": self.version,
                "port": self._port,
                "controller_port": self._controller_port,
                "started_at": time.time(),
                **(
                    {"sasl_ssl_bootstrap": self.sasl_ssl_bootstrap, "sasl_ssl_port": self._sasl_port}
                    if self.sasl_ssl is not None
                    else {}
                ),
            },
        )
        atexit.register(self.stop)

    def _wait_ready(self, deadline: float) -> None:
        """Block until a metadata request lists this broker; raise with the log tail otherwise."""
        import logging

        from kafka import KafkaAdminClient

        assert self._proc is not None and self._port is not None
        last_error: Exception | None = None
        kafka_logger = logging.getLogger("kafka")
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Kafka broker exited with code {self._proc.returncode} during startup; "
                    f"tail of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Kafka broker did not answer on {self.bootstrap} in time (last error: {last_error!r}); "
                    f"tail of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if _port_answers(self._port, timeout=0.5):
                old_level = kafka_logger.level
                kafka_logger.setLevel(logging.CRITICAL)  # connection noise while the broker warms up
                admin = None
                try:
                    admin = KafkaAdminClient(
                        bootstrap_servers=self.bootstrap,
                        request_timeout_ms=5000,
                        client_id="lsti-broker-probe",
                    )
                    cluster = admin.describe_cluster()
                    if any(b.get("broker_id", b.get("node_id")) == 1 for b in cluster.get("brokers", [])):
                        # all client listeners open together; the check guards a misconfigured one
                        if self._sasl_port is None or _port_answers(self._sasl_port, timeout=0.5):
                            return
                        last_error = RuntimeError(f"SASL_SSL listener {_HOST}:{self._sasl_port} not answering")
                    else:
                        last_error = RuntimeError(f"broker not registered yet: {cluster}")
                except Exception as exc:  # any failure means "not ready yet"
                    last_error = exc
                finally:
                    if admin is not None:
                        with contextlib.suppress(Exception):
                            admin.close()
                    kafka_logger.setLevel(old_level)
            time.sleep(0.2)

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self._cleanup()

    def _cleanup(self) -> None:
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self._proc is not None:
            state = _read_state(self.data_dir)
            if state.get("pid") == self._proc.pid:
                state.pop("pid", None)
                state["stopped_at"] = time.time()
                with contextlib.suppress(OSError):
                    _write_state(self.data_dir, state)
        self._proc = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None


# Kafka 3.9 logs through slf4j -> reload4j (log4j 1.x API). Everything goes to the JVM's stdout, which
# start() appends to data_dir/kafka.log; the chattiest loggers are held at WARN.
_LOG4J = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.server.KafkaConfig=WARN
log4j.logger.kafka.network.RequestChannel$=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.org.apache.kafka.storage.internals.log=WARN
log4j.logger.org.apache.kafka.clients=WARN
log4j.logger.org.apache.zookeeper=WARN
"""


def scratch_broker(bootstrap: str | None, data_dir: Path) -> tuple[str, EmbeddedKafka | None]:
    """`bootstrap` if given; else a fresh embedded broker in `data_dir` (wiped first) for one run of a
    demo or benchmark. Returns the bootstrap and the broker to stop (None when not ours)."""
    if bootstrap:
        return bootstrap, None
    shutil.rmtree(data_dir, ignore_errors=True)
    broker = EmbeddedKafka(data_dir)
    return broker.start(), broker


def main_broker(data_dir: Path, port: int | None = None, heap_mb: int = 384) -> int:
    """Foreground ``lsti broker``: run a broker until Ctrl-C/SIGTERM, then stop it cleanly.

    Why foreground: one terminal owns the broker's lifetime; workers and tests in other processes find
    it through ``find_running_broker(data_dir)``.
    """
    data_dir = Path(data_dir)
    running = find_running_broker(data_dir)
    if running is not None:
        print(f"a Kafka broker already runs on {data_dir} at {running}", file=sys.stderr)
        return 1
    broker = EmbeddedKafka(data_dir, port=port, heap_mb=heap_mb)
    t0 = time.monotonic()
    try:
        bootstrap = broker.start()
    except KeyboardInterrupt:
        broker.stop()
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - t0
    print(f"Apache Kafka {broker.version} ready in {elapsed:.1f}s (pid {broker.pid}, log {broker.log_path})")
    print(f"bootstrap: {bootstrap}")
    print("Ctrl-C to stop", flush=True)

    stop_requested = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(signum: int, frame: object) -> None:
        stop_requested.set()

    for s in previous:
        signal.signal(s, _on_signal)
    try:
        while not stop_requested.wait(1.0):
            if not broker.alive():
                print(f"error: the broker exited unexpectedly; tail of {broker.log_path}:", file=sys.stderr)
                print(_tail(broker.log_path), file=sys.stderr)
                broker.stop()
                return 1
        print("stopping Kafka...", flush=True)
        broker.stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("Kafka stopped")
    return 0
